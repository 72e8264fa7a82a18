"""The flow behind ``jaxq run``: data -> float model -> strategies -> evaluate -> report.

:func:`run_recipe` loads the data (``data_dir``, else the recipe's
``data.data_dir``, else ``$JAXQ_DATA_DIR``), trains the float classifier or
loads it from ``model.checkpoint``, applies every strategy of the recipe to that
one model (PTQ, or QAT fine-tuning from it; static activation scales are
calibrated on training batches; ``method: auto`` lets :func:`jaxq.auto_policy` pick
every layer's format on training batches), evaluates each on the test set, and returns a
:class:`jaxq.eval.Report` (also written as JSON and PNG).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxq
import jaxq.flax
from jaxq.algorithms.sensitivity import quantizable_layers
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
from jaxq.policy import path_str
from jaxq.qarray import is_qarray
from jaxq.recipe import Recipe, RecipeError, StrategyConfig
from jaxq.train import train_float, train_qat

__all__ = ["apply_strategy", "auto_choice_table", "auto_strategy", "evaluate", "float_params", "load_data",
           "report_table", "run_recipe", "weight_bits"]

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


CALIBRATION_BATCH = 128
"""Examples per calibration batch (static activation scales, auto sensitivities)."""


def _calibration_stream(train: Dataset, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full training batches: the same ones for every strategy of a run."""
    return batches(train, min(CALIBRATION_BATCH, len(train)), shuffle=True, seed=seed, drop_remainder=True)


def weight_bits(variables: Any, float_variables: Any) -> float:
    """Average stored bits per quantizable weight of ``variables``, scales and zero points included.

    The quantizable weights are those :func:`jaxq.auto_policy` decides (float leaves of rank >= 2
    of ``float_variables`` but biases and embeddings); their bytes in ``variables`` (quantized or
    not) come from :func:`jaxq.tree_nbytes`.
    """
    layers = quantizable_layers(float_variables)
    leaves = {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_qarray)[0]}
    nbytes = sum(jaxq.tree_nbytes(leaves[layer.path]) for layer in layers)
    return 8 * nbytes / sum(layer.size for layer in layers)


def auto_strategy(strategy: StrategyConfig, model: Any, params: Any, train: Dataset, *, seed: int,
                  progress: bool) -> tuple[Any, dict[str, Any]]:
    """``method: auto``: :func:`jaxq.auto_policy` on ``calibration_batches`` training batches, then quantize.

    The objective is the KL of the model's logits from the float model's (``objective: kl``) or
    the cross-entropy on the batches' labels (``objective: loss``). ``extra`` gets
    ``auto_policy`` (:meth:`jaxq.AutoPolicyReport.to_dict`: per-layer choices, sensitivities,
    seconds) and the achieved ``bits_per_weight``.

    Raises:
      RecipeError: on ``budget_bits`` when the candidates cannot meet it (or every layer at the
        largest candidate fits already), on ``candidates`` when none can quantize a layer.
    """
    variables = {"params": params}
    data = list(itertools.islice(_calibration_stream(train, seed), strategy.calibration_batches))
    if not data:
        raise RecipeError("calibration_batches", f"the training set has {len(train)} examples, too few for one "
                          "calibration batch; use more training data")
    if strategy.objective == "loss":
        calib = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data]

        def fn(v: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
            logp = jax.nn.log_softmax(model.apply(v, batch[0]).astype(jnp.float32), axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, batch[1][:, None].astype(jnp.int32), axis=-1))
    else:
        calib = [jnp.asarray(x) for x, _ in data]

        def fn(v: Any, x: jax.Array) -> jax.Array:
            return model.apply(v, x)

    candidates = list(strategy.candidates or ())  # names: the report labels layers with them
    try:
        table = jaxq.sensitivity_table(fn, variables, calib, candidates=candidates, objective=strategy.objective,
                                       estimator=strategy.estimator, seed=seed, progress=progress)
    except ValueError as e:  # a candidate that cannot tile some layer, with nothing else to fall back on
        raise RecipeError("candidates", str(e)) from None
    try:
        policy, report = jaxq.auto_policy(fn, variables, calib, candidates=candidates, budget=strategy.budget_bits,
                                          objective=strategy.objective, table=table, seed=seed)
    except ValueError as e:  # the budget is below the cheapest or above the largest choice
        raise RecipeError("budget_bits", str(e)) from None
    return quantize_jit(variables, policy), {"auto_policy": report.to_dict(), "bits_per_weight": report.bits_per_weight}


def apply_strategy(strategy: StrategyConfig, model: Any, params: Any, train: Dataset, *, seed: int,
                   progress: bool) -> tuple[Any, dict[str, Any]]:
    """The served variables of one strategy (``{"params": ...}`` [+ ``"quant_stats"``]) and extras.

    PTQ quantizes the trained weights; QAT first fine-tunes them (and LSQ scales)
    with fake quantization, then quantizes with the learned scales. Static
    activation scales are calibrated on ``calibration_batches`` training batches.
    ``method: auto`` goes to :func:`auto_strategy`.
    """
    if strategy.method == "auto":
        return auto_strategy(strategy, model, params, train, seed=seed, progress=progress)
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
        xs = (x for x, _ in _calibration_stream(train, seed))
        bar = tqdm(xs, total=n, desc=f"calibrate {strategy.name}", disable=not progress, leave=False, unit="batch")
        limited = (x for i, x in zip(range(n), bar))
        variables = {**variables, jaxq.flax.STATS: jaxq.flax.calibrate(model.apply, variables, limited, policy)}
        bar.close()
    return variables, extra


def _row_bits(strategy: StrategyConfig | None, extra: dict[str, Any] | None) -> float:
    """Nominal bits of a format; an auto strategy's achieved bits per weight (3 decimals)."""
    if strategy is None:
        return 32
    if strategy.method == "auto":
        return round((extra or {}).get("bits_per_weight", strategy.bits), 3)
    return strategy.bits


def evaluate(name: str, model: Any, variables: Any, test: Dataset, recipe: Recipe, *, strategy: StrategyConfig | None,
             float_nbytes: int | None, progress: bool, quantize_s: float = 0.0,
             extra: dict[str, Any] | None = None) -> StrategyResult:
    """Test metrics, bytes and jitted latency of ``variables`` as a :class:`~jaxq.eval.StrategyResult`.

    An auto strategy's row has ``bits`` = the bits per weight it achieved (scales included, from
    ``extra["bits_per_weight"]``), so the plot places it where it really is.
    """
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
        precision_name="fp32" if strategy is None else ("auto" if strategy.method == "auto" else strategy.precision),
        bits=_row_bits(strategy, extra),
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
    for i, s in enumerate(recipe.strategies):
        if s.is_float:
            results.append(dataclasses.replace(baseline, name=s.name))
            continue
        log(_describe(s))
        t0 = time.perf_counter()
        try:
            variables, extra = apply_strategy(s, model, params, train, seed=recipe.train.seed, progress=progress)
        except RecipeError as e:  # a setting that only fails on the model (an auto budget it cannot meet)
            raise e.under(f"strategies[{i}]") from None
        quantize_s = time.perf_counter() - t0
        extra.setdefault("bits_per_weight", weight_bits(variables, {"params": params}))
        if "auto_policy" in extra:
            for line in auto_choice_table(extra["auto_policy"]).splitlines():
                log(f"strategy {s.name}: {line}")
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


def _describe(s: StrategyConfig) -> str:
    if s.method == "auto":
        return (f"strategy {s.name}: auto, <= {s.budget_bits:g} bits per weight from {', '.join(s.candidates or ())} "
                f"({s.estimator} {s.objective} sensitivity on {s.calibration_batches} training batches)")
    return f"strategy {s.name}: {s.method} {s.precision} weights, {s.activations} activations"


def auto_choice_table(info: dict[str, Any]) -> str:
    """Per-layer choices of an auto strategy from its ``extra["auto_policy"]`` (``AutoPolicyReport.to_dict()``)."""
    rows = [("path", "params", "format", "bits")]
    rows += [(r["path"], f"{r['params']:,}", r["choice"], f"{r['bits_per_weight']:.3f}") for r in info["layers"]]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i in (1, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    measured = "not measured" if info["measured"] is None else f"{info['measured']:.4g}"
    lines.append(f"{info['bits_per_weight']:.3f} bits per weight (budget {info['budget_bits']:.3f}); "
                 f"{info['objective']} increase predicted {info['predicted']:.4g}, measured {measured}")
    return "\n".join(lines)


def report_table(report: Report) -> str:
    """The terminal table of a report (baseline deltas and latency ratios), then each auto strategy's choices."""
    text = format_table(report.rows(), report.baseline, title=report.info.get("title", ""))
    for r in report.results:
        if "auto_policy" in r.extra:
            text += f"\n\n{r.name}: per-layer formats\n{auto_choice_table(r.extra['auto_policy'])}"
    return text


