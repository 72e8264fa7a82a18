"""jaxq vs Qwix: the same trained MNIST MLP quantized by both, int8 and int4 weight-only PTQ.

    JAXQ_DATA_DIR=/work/shared/data python benchmarks/vs_qwix.py [--json out.json]

Both quantize the weights of every Dense layer symmetrically with one scale per
output channel (Qwix's default channelwise scales for a Dense kernel; jaxq's
``per_channel``), biases stay float, activations stay float. The model is the
float checkpoint shared by ``configs/mnist_*.yaml`` (trained on first use).

Both map ``max|w|`` to ``qmax + 0.5`` for int4 (7.5: the full-range grid
``[-8, 7]``, jaxq's default at <= 4 bits). At int8 Qwix does the same while jaxq
keeps the narrow grid (absmax onto 127, nothing clipped). jaxq's shipped recipes (configs/mnist_int8_ptq.yaml,
configs/mnist_int4_ptq.yaml) use the ``mse`` search for a per-channel clip
ratio. The recipe setting is the one compared with Qwix; ``absmax`` is shown too.
Besides accuracy, "agree %" is the share of test images whose predicted class
is the float model's: a finer measure of fidelity than accuracy, whose
differences at 8 bits are a handful of images out of 10,000.

Latency: the jitted forward pass of each served model on one batch (weights
stay quantized inside the jitted function for both), timed in interleaved
rounds so that machine load hits every variant alike; the table gives the
median and its ratio to Qwix and to the float model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxq  # noqa: E402
from jaxq import flow  # noqa: E402
from jaxq.eval import classification_metrics, make_predict_fn, predict  # noqa: E402
from jaxq.models.classifiers import MLP  # noqa: E402
from jaxq.recipe import load_recipe  # noqa: E402


def qwix_ptq(model: nn.Module, params: Any, x: jax.Array, bits: int) -> tuple[nn.Module, Any]:
    """Qwix PTQ of a linen model: (quantized model, quantized params)."""
    import qwix

    qtype = {8: jnp.int8, 4: jnp.int4}[bits]
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"]
    qparams = qwix.quantize_params(params, abstract)
    return qmodel, {"params": qparams}


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, iters: int) -> dict[str, float]:
    """Median ms per call of each zero-argument function, timed in interleaved rounds."""
    for f in fns.values():  # compile and warm up
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                jax.block_until_ready(f())
                times.append((time.perf_counter() - t) * 1e3)
            per_round[k].append(statistics.median(times))
    return {k: statistics.median(v) for k, v in per_round.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "mnist_int8_ptq.yaml"),
                    help="recipe giving the data and the float model (its checkpoint is reused)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 1000], help="latency batch sizes")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe)
    train, test = flow.load_data(recipe, args.data_dir)
    jmodel = MLP(hidden=recipe.model.hidden, num_classes=train.num_classes)  # jaxq.flax.linen layers
    fmodel = MLP(hidden=recipe.model.hidden, num_classes=train.num_classes, layers=nn)  # stock flax
    params, _ = flow.float_params(recipe, jmodel, train, retrain=False, progress=False,
                                 log=lambda m: print(f"[vs_qwix] {m}", file=sys.stderr))
    x0 = jnp.asarray(test.images[:1])

    variants: dict[str, tuple[nn.Module, Any]] = {"float": (fmodel, {"params": params})}
    shipped = {  # the strategies of the shipped recipes
        "int8": load_recipe(ROOT / "configs" / "mnist_int8_ptq.yaml").strategies[0],
        "int4": next(s for s in load_recipe(ROOT / "configs" / "mnist_int4_ptq.yaml").strategies if s.name == "int4"),
    }
    for name, strategy in shipped.items():
        assert strategy.method == "ptq" and strategy.granularity == "per_channel" and strategy.activations == "float"
        absmax = dataclasses.replace(strategy, range_method="absmax", name=None)
        variants[f"jaxq {name}"] = (jmodel, flow.quantize_jit({"params": params}, strategy.policy()))
        variants[f"jaxq {name} absmax"] = (jmodel, flow.quantize_jit({"params": params}, absmax.policy()))
        variants[f"qwix {name}"] = qwix_ptq(fmodel, params, x0, strategy.bits)

    acc: dict[str, dict[str, Any]] = {}
    preds: dict[str, np.ndarray] = {}
    for k, (model, variables) in variants.items():
        preds[k] = predict(make_predict_fn(model.apply), variables, test, 1000)
        acc[k] = classification_metrics(test.labels, preds[k], test.num_classes)
        acc[k]["agree_with_float"] = float(np.mean(preds[k] == preds["float"]))
        acc[k]["nbytes"] = int(jaxq.tree_nbytes(variables)) if k.startswith(("jaxq", "float")) else None

    latency: dict[int, dict[str, float]] = {}
    for b in args.batch:
        xb = jax.device_put(jnp.asarray(test.images[:b]))
        fns = {}
        for k, (model, variables) in variants.items():
            f = jax.jit(model.apply)
            fns[k] = (lambda f=f, v=variables: f(v, xb))
        latency[b] = time_interleaved(fns, args.rounds, args.iters)

    # --- the table ------------------------------------------------------------------------------
    lat_cols = [f"ms@{b}" for b in args.batch]
    header = ["setting", "library", "acc %", "Δ vs float", "agree %", "F1 %"] + lat_cols + \
             [f"÷qwix@{b}" for b in args.batch] + [f"÷float@{b}" for b in args.batch]
    rows = []
    f_acc = acc["float"]["accuracy"]
    for k in variants:
        setting, lib = ("float", "-") if k == "float" else (k.split(" ", 1)[1], k.split(" ", 1)[0])
        if lib == "jaxq" and setting.endswith("absmax"):
            lib, setting = "jaxq absmax", setting.split()[0]
        elif lib == "jaxq":
            lib = f"jaxq {shipped[setting].range_method}"
        qwix_key = f"qwix {setting}"
        row = [setting, lib, f"{100 * acc[k]['accuracy']:.2f}", f"{100 * (acc[k]['accuracy'] - f_acc):+.2f}",
               f"{100 * acc[k]['agree_with_float']:.2f}", f"{100 * acc[k]['f1']:.2f}"]
        row += [f"{latency[b][k]:.3f}" for b in args.batch]
        row += [f"{latency[b][k] / latency[b][qwix_key]:.2f}" if qwix_key in variants else "-" for b in args.batch]
        row += [f"{latency[b][k] / latency[b]['float']:.2f}" for b in args.batch]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    dev = jax.devices()[0]
    print(f"MNIST MLP {'-'.join(['784', *map(str, recipe.model.hidden), '10'])}, test n={len(test)}, "
          f"weight-only PTQ, per-output-channel symmetric scales; {jax.default_backend()} "
          f"({getattr(dev, 'device_kind', dev)}), {os.cpu_count()} CPUs")
    print(fmt(header))
    print("-" * len(fmt(header)))
    for r in rows:
        print(fmt(r))

    verdict = {s: acc[f"jaxq {s}"]["accuracy"] >= acc[f"qwix {s}"]["accuracy"] for s in shipped}
    print("\njaxq (recipe setting) >= Qwix accuracy: " + ", ".join(f"{s}: {'yes' if ok else 'NO'}" for s, ok in verdict.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"accuracy": acc, "latency_ms": latency, "jaxq_ge_qwix": verdict},
                                              indent=2))
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
