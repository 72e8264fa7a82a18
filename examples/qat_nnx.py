"""Quantization-aware training (QAT) of a Flax NNX model with optax, using jaxq.

    python examples/qat_nnx.py        # scikit-learn's bundled digits: no download, ~1 min on CPU

1. Build the model from ``jaxq.flax.nnx`` layers (drop-ins for ``flax.nnx``:
   same constructor, same ``Param`` tree, float numerics unchanged).
2. Train it in float, functionally: ``nnx.split`` the params, jit an optax step,
   ``nnx.merge`` inside the loss.
3. QAT: the loss runs the model on ``jaxq.flax.qat_params(params, policy, scales)``
   - fake-quantized weights with straight-through gradients, plus (for W4A8)
   fake-quantized activations - and optax updates both the float weights and the
   learnable LSQ scales from ``jaxq.flax.init_qat_scales``.
4. Serve: ``jaxq.quantize(params, policy, scales=scales)`` with the learned scales,
   ``nnx.merge`` it into a model and call it. What was trained is what is served.
   (For a stateful model in hand, ``jaxq.flax.nnx.quantize_model(model, policy,
   scales=...)`` swaps its ``Param`` state in place.)

Compared against plain PTQ of the same float model, for W4A8 and for 2-bit weights.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxq  # noqa: E402
from jaxq.data import batches, load_dataset  # noqa: E402
from jaxq.flax import init_qat_scales, nnx, qat_params  # noqa: E402  (nnx: drop-in for flax.nnx)


class MLP(nnx.Module):
    def __init__(self, din: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(din, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def fit(loss_fn, state, train, epochs: int, lr: float):
    """A plain jitted optax loop over ``state`` (any pytree) with a cosine schedule."""
    steps = epochs * (len(train) // 64)
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = opt.init(state)

    @jax.jit
    def step(state, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(state, x, y)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    for epoch in range(epochs):
        for x, y in batches(train, 64, shuffle=True, seed=epoch, drop_remainder=True):
            state, opt_state, loss = step(state, opt_state, x, y)
    return state


def main() -> None:
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    model = MLP(64, 128, 10, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def forward(p, x):
        return nnx.merge(graphdef, p)(x)

    def accuracy(p) -> float:
        logits = jax.jit(forward)(p, test.images)
        return 100 * float(jnp.mean(jnp.argmax(logits, -1) == test.labels))

    # --- 2. float ----------------------------------------------------------------------------
    params = fit(lambda p, x, y: cross_entropy(forward(p, x), y), params, train, epochs=30, lr=3e-3)
    float_bytes = jaxq.tree_nbytes(params)
    print(f"float                 {accuracy(params):6.2f}%")

    for label, policy in (
        ("W4A8", jaxq.as_policy("w4a8")),  # int4 weights per channel, int8 activations per token
        ("W2 (ternary)", jaxq.Policy((jaxq.Rule("kernel", weight=jaxq.QuantSpec("int2", range_method="mse")),),
                                     name="int2-mse")),
    ):
        # PTQ of the float model, for reference.
        ptq = accuracy(jaxq.quantize(params, policy))

        # --- 3. QAT: float weights + LSQ scales, both trained by optax ------------------------
        scales = init_qat_scales(params, policy)  # {"fc1/kernel/value": scale, ...}

        def qat_loss(state, x, y):
            p, s = state
            return cross_entropy(forward(qat_params(p, policy, s), x), y)

        qat_p, qat_s = fit(qat_loss, (params, scales), train, epochs=10, lr=1e-3)

        # --- 4. serve: quantize with the learned scales, build the model on the quantized state ---
        served = jaxq.quantize(qat_p, policy, scales=qat_s)
        qmodel = nnx.merge(graphdef, served)  # a model object whose kernels are QArrays
        logits = nnx.jit(lambda m, x: m(x))(qmodel, test.images)
        served_acc = 100 * float(jnp.mean(jnp.argmax(logits, -1) == test.labels))
        print(f"{label:<14} PTQ {ptq:6.2f}%   QAT {served_acc:6.2f}%   "
              f"({jaxq.tree_nbytes(served):,} bytes vs {float_bytes:,} float)")
    print("\n" + jaxq.summarize(served))


if __name__ == "__main__":
    main()
