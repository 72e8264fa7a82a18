"""Serving latency on CPU: float vs jaxq (int8, int4, W8A8) vs Qwix weight-only PTQ.

Models: an MLP (784-1024-1024-10) and a small CNN (28x28x1 -> 3 convs -> 10). Each
variant is jitted, warmed up, then timed ``--reps`` times per batch size; the table
gives the median and the ratio to the float model measured in the same run.

    python benchmarks/serving_latency.py            # batch 1 and 32, both models
    python benchmarks/serving_latency.py --reps 50 --batches 1

jaxq variants use ``jaxq.flax.linen`` layers on trees from ``jaxq.quantize``; Qwix
uses ``qwix.PtqProvider`` + ``qwix.quantize_model`` + ``qwix.quantize_params``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxq  # noqa: E402
from jaxq.flax import linen as qnn  # noqa: E402


def mlp(nn: Any) -> Any:
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(1024)(x))
            x = nn.relu(nn.Dense(1024)(x))
            return nn.Dense(10)(x)

    return MLP()


def cnn(nn: Any) -> Any:
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (3, 3))(x))
            x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
            x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    return CNN()


MODELS = {"mlp": mlp, "cnn": cnn}


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int, inner: int = 3) -> dict[str, float]:
    """Median ms per call of each fn, timing the variants in turn each round.

    Interleaving makes the ratios robust to machine load that drifts during the run
    (CPU machines here are shared).
    """
    for fn in fns.values():  # compile + warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / inner)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def qwix_ptq(make: Callable[[Any], Any], params: Any, x: jax.Array) -> tuple[Callable, Any]:
    import qwix

    rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]
    model = qwix.quantize_model(make(fnn), qwix.PtqProvider(rules))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    qparams = qwix.quantize_params(params["params"], abstract)
    return jax.jit(model.apply), {"params": qparams}


def variants(make: Callable[[Any], Any], params: Any, x: jax.Array) -> dict[str, tuple[Callable, Any]]:
    jq = jax.jit(make(qnn).apply)
    out: dict[str, tuple[Callable, Any]] = {"float (flax)": (jax.jit(make(fnn).apply), params)}
    for name, policy in [("jaxq int8", "int8"), ("jaxq int4", "int4"), ("jaxq W8A8", "w8a8")]:
        out[name] = (jq, jaxq.quantize(params, policy))
    try:
        out["qwix int8 PTQ"] = qwix_ptq(make, params, x)
    except Exception as e:  # noqa: BLE001 - reported in the table
        out["qwix int8 PTQ"] = (None, f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    return out


def run(models: list[str], batches: list[int], reps: int) -> str:
    rows = ["| model | batch | variant | weights (KiB) | median latency (ms) | vs float |",
            "|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for m in models:
        make = MODELS[m]
        x1 = jnp.asarray(rng.normal(size=(1, 28, 28, 1)), jnp.float32)
        params = jax.jit(make(fnn).init)(jax.random.key(0), x1)
        vs = variants(make, params, x1)
        for b in batches:
            x = jnp.asarray(rng.normal(size=(b, 28, 28, 1)), jnp.float32)
            runnable = {}
            for name, (fn, p) in vs.items():
                if fn is None:
                    continue
                try:
                    jax.block_until_ready(fn(p, x))
                    runnable[name] = (lambda fn=fn, p=p: fn(p, x))
                except Exception as e:  # noqa: BLE001 - reported in the table
                    vs[name] = (None, f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            ms = interleaved_medians(runnable, reps)
            base = ms["float (flax)"]
            for name, (fn, p) in vs.items():
                if fn is None:
                    rows.append(f"| {m} | {b} | {name} | - | {p} | - |")
                    continue
                kib = jaxq.tree_nbytes(p) / 1024
                rows.append(f"| {m} | {b} | {name} | {kib:,.0f} | {ms[name]:.3f} | {ms[name] / base:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    print(run(args.models.split(","), [int(b) for b in args.batches.split(",")], args.reps))


if __name__ == "__main__":
    main()
