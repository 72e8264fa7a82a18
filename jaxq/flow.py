"""The flow behind ``jaxq run``: data -> float model -> strategies -> evaluate -> report.

:func:`run_recipe` loads the data (``data_dir``, else the recipe's
``data.data_dir``, else ``$JAXQ_DATA_DIR``), trains the float classifier or
loads it from ``model.checkpoint``, applies every strategy of the recipe to that
one model (PTQ, or QAT fine-tuning from it; static activation scales are
calibrated on training batches), evaluates each on the test set, and returns a
:class:`jaxq.eval.Report` (also written as JSON and PNG).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxq
import jaxq.flax
from jaxq.data import Dataset, batches, load_dataset
from jaxq.eval import (
    Report,
    StrategyResult,
    classification_metrics,
    format_table,
    make_predict_fn,
    measure_latency,
    plot_results,
    predict,
    write_json,
)
from jaxq.models.classifiers import build_classifier
from jaxq.recipe import Recipe, RecipeError, StrategyConfig
from jaxq.train import train_float, train_qat

__all__ = ["apply_strategy", "evaluate", "float_params", "load_data", "report_table", "run_recipe"]

Log = Callable[[str], None]


def _limit(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return Dataset(ds.images[:n], ds.labels[:n], ds.num_classes, ds.name, ds.class_names, ds.split)


def load_data(recipe: Recipe, data_dir: str | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of the recipe; ``data_dir`` overrides ``data.data_dir``."""
    d = recipe.data
    where = data_dir or d.data_dir
    kw = dict(source=d.source, allow_download=d.allow_download)
    train = load_dataset(d.dataset, "train", where, **kw)
    test = load_dataset(d.dataset, "test", where, **kw)
    return _limit(train, d.train_limit), _limit(test, d.test_limit)


def _model_meta(recipe: Recipe, train: Dataset) -> dict[str, Any]:
    m = recipe.model
    return {"arch": m.arch, "hidden": list(m.hidden), "channels": list(m.channels) if m.arch == "cnn" else [],
            "num_classes": train.num_classes, "image_shape": list(train.image_shape), "dataset": train.name}


def float_params(recipe: Recipe, model: Any, train: Dataset, *, retrain: bool, progress: bool,
                 log: Log) -> tuple[Any, dict[str, Any]]:
    """The float params: loaded from ``model.checkpoint`` if it exists (unless ``retrain``), else trained.

    Returns:
      ``(params, info)`` with ``info["source"]`` ``"checkpoint"`` or ``"trained"``,
      the training time and the per-epoch losses.
    """
    ckpt = recipe.model.checkpoint
    meta = _model_meta(recipe, train)
    if ckpt and os.path.exists(ckpt) and not retrain:
        tree = jaxq.load(ckpt)
        saved = tree.get("meta", {}) if isinstance(tree, dict) else {}
        diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
        if diff or "params" not in tree:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in diff.items())
            raise RecipeError("model.checkpoint", f"{ckpt} does not hold this recipe's model ({detail or 'no params'}); "
                              "pass --retrain to overwrite it, or point model.checkpoint elsewhere")
        log(f"loaded float model from {ckpt}")
        params = jax.tree_util.tree_map(jnp.asarray, tree["params"])
        return params, {"source": "checkpoint", "path": ckpt, "train_s": 0.0, "losses": []}
    t = recipe.train
    log(f"training float {recipe.model.arch} on {len(train)} {train.name} images "
        f"({t.epochs} epochs, batch {t.batch_size}, {t.optimizer} lr {t.learning_rate:g})")
    t0 = time.perf_counter()
    result = train_float(model, train, epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
                         optimizer=t.optimizer, schedule=t.schedule, weight_decay=t.weight_decay, seed=t.seed,
                         progress=progress)
    info = {"source": "trained", "train_s": time.perf_counter() - t0, "losses": list(result.epoch_losses)}
    if ckpt:
        os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)
        jaxq.save(ckpt, {"params": result.state, "meta": meta})
        info["path"] = ckpt
        log(f"saved float model to {ckpt}")
    return result.state, info


def quantize_jit(variables: Any, policy: Any, scales: Any = None) -> Any:
    """``jaxq.quantize`` as one jitted computation (one compilation instead of one per eager op).

    Under ``jit`` quantize cannot check for NaN/Inf itself, so the check runs here first.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        if not np.isfinite(np.asarray(leaf)).all():
            raise ValueError(f"{jax.tree_util.keystr(path)}: the float model has NaN/Inf weights; retrain it")
    return jax.jit(lambda v, s: jaxq.quantize(v, policy, scales=s))(variables, scales)


def apply_strategy(strategy: StrategyConfig, model: Any, params: Any, train: Dataset, *, seed: int,
                   progress: bool) -> tuple[Any, dict[str, Any]]:
    """The served variables of one strategy (``{"params": ...}`` [+ ``"quant_stats"``]) and extras.

    PTQ quantizes the trained weights; QAT first fine-tunes them (and LSQ scales)
    with fake quantization, then quantizes with the learned scales. Static
    activation scales are calibrated on ``calibration_batches`` training batches.
    """
    policy = strategy.policy()
    extra: dict[str, Any] = {}
    if strategy.is_float:
        return {"params": params}, extra
    scales = None
    if strategy.method == "qat":
        q = strategy.qat
        params, scales, losses = train_qat(
            model, params, train, policy, epochs=q.epochs, batch_size=q.batch_size, learning_rate=q.learning_rate,
            scale_learning_rate=q.scale_learning_rate, learn_scales=q.learn_scales, seed=seed, progress=progress)
        extra["qat_losses"] = list(losses)
    variables = quantize_jit({"params": params}, policy, scales)
    if strategy.activation_mode == "static":
        n = strategy.calibration_batches
        xs = (x for x, _ in batches(train, 128, shuffle=True, seed=seed, drop_remainder=True))
        bar = tqdm(xs, total=n, desc=f"calibrate {strategy.name}", disable=not progress, leave=False, unit="batch")
        limited = (x for i, x in zip(range(n), bar))
        variables = {**variables, jaxq.flax.STATS: jaxq.flax.calibrate(model.apply, variables, limited, policy)}
        bar.close()
    return variables, extra


def evaluate(name: str, model: Any, variables: Any, test: Dataset, recipe: Recipe, *, strategy: StrategyConfig | None,
             float_nbytes: int | None, progress: bool, quantize_s: float = 0.0,
             extra: dict[str, Any] | None = None) -> StrategyResult:
    """Test metrics, bytes and jitted latency of ``variables`` as a :class:`~jaxq.eval.StrategyResult`."""
    e = recipe.eval
    bs = min(e.batch_size, len(test))
    fn = make_predict_fn(model.apply)  # one compilation serves the metrics and the latency
    y_pred = predict(fn, variables, test, bs, progress=progress, desc=f"eval {name}")
    m = classification_metrics(test.labels, y_pred, test.num_classes)
    lat = measure_latency(fn, variables, test.images[:bs], iters=e.latency_iters, warmup=e.latency_warmup,
                          jit=False)
    nbytes = jaxq.tree_nbytes(variables)
    return StrategyResult(
        name=name,
        precision_name="fp32" if strategy is None else strategy.precision,
        bits=32 if strategy is None else strategy.bits,
        activations="float" if strategy is None else strategy.activations,
        method="float" if strategy is None or strategy.is_float else strategy.method,
        accuracy=m["accuracy"], precision=m["precision"], recall=m["recall"], f1=m["f1"],
        nbytes=int(nbytes), compression=(float_nbytes or nbytes) / nbytes,
        latency_ms=lat["median_ms"], latency_batch=bs, quantize_s=quantize_s,
        extra={**(extra or {}), "latency": lat},
    )


def _environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "python": platform.python_version(), "cpus": os.cpu_count()}


def run_recipe(recipe: Recipe, *, data_dir: str | None = None, output_dir: str | None = None,
               retrain: bool = False, progress: bool = False, log: Log | None = None) -> Report:
    """Runs a recipe end to end and writes its outputs.

    Args:
      recipe: a validated recipe.
      data_dir: overrides ``data.data_dir`` (and ``$JAXQ_DATA_DIR``).
      output_dir: overrides ``output.dir``.
      retrain: train the float model even if ``model.checkpoint`` exists.
      progress: tqdm bars for training, calibration and evaluation.
      log: receives one-line progress messages (default: silent).

    Returns:
      The :class:`~jaxq.eval.Report` (also written as JSON and PNG when the recipe asks).
    """
    log = log or (lambda _msg: None)
    t_start = time.perf_counter()
    train, test = load_data(recipe, data_dir)
    log(f"data: {train.name} train {len(train)} / test {len(test)}, images {train.image_shape}")
    m = recipe.model
    model = build_classifier(m.arch, train.num_classes, hidden=m.hidden, channels=m.channels)
    params, train_info = float_params(recipe, model, train, retrain=retrain, progress=progress, log=log)
    float_nbytes = jaxq.tree_nbytes({"params": params})
    baseline = evaluate("float", model, {"params": params}, test, recipe, strategy=None, float_nbytes=float_nbytes,
                        progress=progress)
    log(f"float: accuracy {100 * baseline.accuracy:.2f}%")
    out_dir = output_dir or recipe.output_dir
    results = []
    for s in recipe.strategies:
        if s.is_float:
            results.append(dataclasses.replace(baseline, name=s.name))
            continue
        log(f"strategy {s.name}: {s.method} {s.precision} weights, {s.activations} activations")
        t0 = time.perf_counter()
        variables, extra = apply_strategy(s, model, params, train, seed=recipe.train.seed, progress=progress)
        quantize_s = time.perf_counter() - t0
        r = evaluate(s.name, model, variables, test, recipe, strategy=s, float_nbytes=float_nbytes,
                     progress=progress, quantize_s=quantize_s, extra=extra)
        log(f"strategy {s.name}: accuracy {100 * r.accuracy:.2f}% ({100 * (r.accuracy - baseline.accuracy):+.2f})")
        results.append(r)
        if recipe.output.save_models:
            os.makedirs(out_dir, exist_ok=True)
            jaxq.save(os.path.join(out_dir, f"{s.name}.jaxq"), variables)
    info = {
        "dataset": train.name, "n_train": len(train), "n_test": len(test), "image_shape": list(train.image_shape),
        "float_model": train_info, "total_s": time.perf_counter() - t_start, "environment": _environment(),
    }
    files = {}
    if recipe.output.json:
        files["json"] = os.path.join(out_dir, recipe.output.json)
    if recipe.output.plot:
        files["plot"] = os.path.join(out_dir, recipe.output.plot)
    info["files"] = files
    info["title"] = f"{recipe.name}: {recipe.model.arch} on {train.name} (test n={len(test)})"
    report = Report(recipe.to_dict(), baseline, tuple(results), info)
    if "json" in files:
        write_json(files["json"], report)
    if "plot" in files:
        plot_results(report.rows(), files["plot"], title=info["title"], baseline=baseline)
    return report


def report_table(report: Report) -> str:
    """The terminal table of a report (baseline deltas and latency ratios)."""
    return format_table(report.rows(), report.baseline, title=report.info.get("title", ""))


