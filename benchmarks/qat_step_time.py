"""QAT training-step time vs the float training step on CPU (same run, interleaved).

Models: the MLP (784-1024-1024-10) and CNN of ``serving_latency.py``, trained with
optax Adam on a random batch. Variants: float; QAT with STE (``jaxq.flax.qat_params``)
for int8 weight-only, W8A8 and int4 + int8 activations; QAT with LSQ learnable
scales (``init_qat_scales``) for W8A8.

    python benchmarks/qat_step_time.py --batch 64 --reps 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # run from a checkout; the sibling script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxq  # noqa: E402
from jaxq.flax import init_qat_scales, qat_params  # noqa: E402
from jaxq.flax import linen as qnn  # noqa: E402
from serving_latency import MODELS, interleaved_medians  # noqa: E402

A8 = jaxq.QuantSpec("int8", granularity="per_token")
POLICIES = {
    "QAT int8 (STE)": ("int8", False),
    "QAT W8A8 (STE)": ("w8a8", False),
    "QAT W4A8 (STE)": (jaxq.Policy((jaxq.Rule("kernel", weight="int4", activation=A8),)), False),
    "QAT W8A8 (LSQ)": ("w8a8", True),
}


def make_step(model: Any, policy: Any, lsq: bool, qat: bool) -> Callable:
    opt = optax.adam(1e-3)

    def loss_fn(v, s, x, y):
        tree = qat_params(v, policy, s or None) if qat else v
        logits = model.apply(tree, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(v, s, st, x, y):
        loss, g = jax.value_and_grad(loss_fn, argnums=(0, 1))(v, s, x, y)
        upd, st = opt.update(g, st, (v, s))
        v, s = optax.apply_updates((v, s), upd)
        return v, s, st, loss

    return step, opt


def run(models: list[str], batch: int, reps: int) -> str:
    rows = ["| model | batch | variant | median step (ms) | vs float |", "|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=(batch,)))
    for m in models:
        model = MODELS[m](qnn)
        v = jax.jit(model.init)(jax.random.key(0), x[:1])
        fns = {}
        for name, (policy, lsq) in {"float": (None, False), **POLICIES}.items():
            qat = policy is not None
            s = init_qat_scales(v, policy) if lsq else {}
            step, opt = make_step(model, policy, lsq, qat)
            st = opt.init((v, s))
            fns[name] = (lambda step=step, s=s, st=st: step(v, s, st, x, y)[3])
        ms = interleaved_medians(fns, reps, inner=1)
        for name, t in ms.items():
            rows.append(f"| {m} | {batch} | {name} | {t:.2f} | {t / ms['float']:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    print(f"backend: {jax.default_backend()}")
    print(run(args.models.split(","), args.batch, args.reps))


if __name__ == "__main__":
    main()
