"""Post-training quantization of a Flax linen model with the jaxq library (no recipe, no CLI).

    python examples/ptq_linen.py            # scikit-learn's bundled digits: no download, ~30 s on CPU

1. Build the model from ``jaxq.flax.linen`` layers: the same param tree as
   ``flax.linen`` and the same float numerics, but the layers also accept
   quantized params.
2. Train it in float (a few hundred optax steps).
3. ``jaxq.quantize`` the params with a preset or a hand-written policy, and run
   the *same* model on them. Bytes via ``jaxq.tree_nbytes``; the quantized tree
   saves and loads with ``jaxq.save`` / ``jaxq.load`` (codes stay packed).
4. Static W8A8: calibrate activation scales once with ``jaxq.flax.calibrate``.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxq  # noqa: E402
import jaxq.flax  # noqa: E402
from jaxq.data import batches, load_dataset  # noqa: E402
from jaxq.flax import linen as nn  # noqa: E402  (drop-in for flax.linen)


class MLP(nn.Module):
    hidden: int = 128
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


def accuracy(model: nn.Module, variables, images, labels) -> float:
    logits = jax.jit(model.apply)(variables, images)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def main() -> None:
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    model = MLP()

    # --- 2. float training ---------------------------------------------------------------
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), train.images[:1])
    opt = optax.adam(3e-3)
    opt_state = opt.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(v):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(variables, updates), opt_state, loss

    for epoch in range(30):
        for x, y in batches(train, 64, shuffle=True, seed=epoch, drop_remainder=True):
            variables, opt_state, loss = step(variables, opt_state, x, y)
    float_bytes = jaxq.tree_nbytes(variables)
    print(f"{'float':<18} acc {100 * accuracy(model, variables, test.images, test.labels):6.2f}%  "
          f"{float_bytes:7,d} bytes")

    # --- 3. PTQ: presets and a custom policy -----------------------------------------------
    custom = jaxq.Policy((
        jaxq.Rule(r"Dense_1/kernel", weight="int8"),  # keep the small classifier at 8 bits
        jaxq.Rule(r"kernel", weight=jaxq.QuantSpec("int4", range_method="mse")),  # the rest: int4, MSE clip
    ), name="int4-mse+int8-head")
    for policy in ("int8", "int4", "w8a8", custom):
        q = jaxq.quantize(variables, policy)  # pure function; biases stay float
        name = policy if isinstance(policy, str) else policy.name
        nbytes = jaxq.tree_nbytes(q)
        print(f"{name:<18} acc {100 * accuracy(model, q, test.images, test.labels):6.2f}%  "
              f"{nbytes:7,d} bytes ({float_bytes / nbytes:.1f}x smaller)")

    print("\n" + jaxq.summarize(jaxq.quantize(variables, custom)))

    # Save / load: atomic, checksummed, int4 codes stay packed on disk.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mlp-int4.jaxq")
        jaxq.save(path, jaxq.quantize(variables, "int4"))
        restored = jaxq.load(path)
        print(f"\nreloaded int4 from {os.path.getsize(path):,} bytes on disk: "
              f"acc {100 * accuracy(model, restored, test.images, test.labels):.2f}%")

    # --- 4. static W8A8: activation scales calibrated once, then frozen ----------------------
    w8a8_static = jaxq.Policy((jaxq.Rule("kernel", weight="int8",
                                         activation=jaxq.QuantSpec("int8", granularity="per_tensor"),
                                         activation_mode="static"),), name="w8a8-static")
    q = jaxq.quantize(variables, w8a8_static)
    calib = (x for x, _ in batches(train, 128, shuffle=True, seed=0))
    stats = jaxq.flax.calibrate(model.apply, q, calib, w8a8_static)  # {"Dense_0": {"act_scale": ...}, ...}
    served = {**q, jaxq.flax.STATS: stats}
    print(f"w8a8 static acc {100 * accuracy(model, served, test.images, test.labels):.2f}%  "
          f"(scales: { {k: round(float(v['act_scale']), 5) for k, v in stats.items()} })")


if __name__ == "__main__":
    main()
