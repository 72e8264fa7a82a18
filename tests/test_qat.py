"""Quantization-aware training: the policy drives fake quantization; what is trained is served.

Serving-vs-QAT tolerance: the served model computes ``(x @ codes) * scale`` (or an
int8 x int8 -> int32 dot, then scales) where QAT computes ``x @ (codes * scale)`` in
float32, so outputs agree up to float32 reassociation, ``<= 1e-4 * max|y|``. In a
W8A8 network such a 1-ulp difference can in rare cases move an activation across
an int8 rounding boundary in the next layer, so the classification decisions are
compared as well (they must agree on every example).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxq
from jaxq.flax import QatWeight, init_qat_scales, qat_params
from jaxq.flax import linen as nn
from jaxq.flax import nnx

KEY = jax.random.key(0, impl="rbg")  # threefry takes seconds to compile on CPU
A8 = jaxq.QuantSpec("int8", granularity="per_token")


def normal(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def mlp_task(n=256):
    x = normal((n, 16), seed=1)
    teacher = normal((16, 4), seed=2)
    return x, jnp.argmax(x @ teacher, axis=-1)


def cnn_task(n=128):
    x = normal((n, 8, 8, 1), seed=3)
    quads = x.reshape(n, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(n, 4)
    return x, jnp.argmax(quads, axis=-1)


def jit_quantize(v, policy, scales=None):
    """``jaxq.quantize`` under jit (eager, each small op compiles separately: slow on CPU)."""
    return jax.jit(lambda v, s: jaxq.quantize(v, policy, scales=s))(v, scales)


def jit_init_scales(v, policy):
    return jax.jit(lambda v: init_qat_scales(v, policy))(v)


def train(model, policy, x, y, steps, lsq, lr=1e-2):
    variables = jax.jit(model.init)(KEY, x[:1])
    scales = jit_init_scales(variables, policy) if lsq else {}
    opt = optax.adam(lr)
    state = opt.init((variables, scales))

    def loss_fn(v, s):
        logits = model.apply(qat_params(v, policy, s or None), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(v, s, st):
        loss, g = jax.value_and_grad(loss_fn, argnums=(0, 1))(v, s)
        upd, st = opt.update(g, st, (v, s))
        v, s = optax.apply_updates((v, s), upd)
        return v, s, st, loss

    losses = []
    for _ in range(steps):
        variables, scales, state, loss = step(variables, scales, state)
        losses.append(float(loss))
    return variables, scales, losses


def test_qat_params_marks_quantized_weights_and_passes_gradients():
    x, y = mlp_task(32)
    v = jax.jit(MLP().init)(KEY, x[:1])
    qp = jax.jit(lambda v: qat_params(v, "w8a8"))(v)
    k = qp["params"]["Dense_0"]["kernel"]
    assert isinstance(k, QatWeight) and k.meta.act_spec is not None and k.meta.weight_spec.format == "int8"
    assert not isinstance(qp["params"]["Dense_0"]["bias"], QatWeight)  # rank-1: never quantized
    served = jit_quantize(v, "w8a8")["params"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(k.value, jax.jit(lambda q: q.dequantize())(served))

    scales = jit_init_scales(v, "w8a8")
    assert set(scales) == {"params/Dense_0/kernel", "params/Dense_1/kernel"}
    assert scales["params/Dense_0/kernel"].shape == (1, 32)

    def loss(v, s):
        return jnp.sum(MLP().apply(qat_params(v, "w8a8", s), x) ** 2)

    gv, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, scales)
    for g in (gv["params"]["Dense_0"]["kernel"], gs["params/Dense_0/kernel"], gs["params/Dense_1/kernel"]):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


def _agree(served, qat):
    tol = 1e-4 * float(jnp.max(jnp.abs(qat)))
    np.testing.assert_allclose(served, qat, atol=tol, rtol=0)
    np.testing.assert_array_equal(jnp.argmax(served, -1), jnp.argmax(qat, -1))


def test_mlp_w8a8_lsq_training_improves_and_serving_matches_qat():
    x, y = mlp_task()
    policy = jaxq.as_policy("w8a8")
    v, scales, losses = train(MLP(), policy, x, y, steps=80, lsq=True)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    served_tree = jit_quantize(v, policy, scales)
    assert served_tree["params"]["Dense_0"]["kernel"].values.dtype == jnp.int8
    # the learned scales are the served ones, and they moved during training
    np.testing.assert_array_equal(served_tree["params"]["Dense_0"]["kernel"].scale,
                                  jnp.abs(scales["params/Dense_0/kernel"]))
    init_s = jit_init_scales(v, policy)["params/Dense_0/kernel"]
    assert float(jnp.max(jnp.abs(scales["params/Dense_0/kernel"] - init_s))) > 0
    qat_logits = jax.jit(MLP().apply)(qat_params(v, policy, scales), x)
    served = jax.jit(MLP().apply)(served_tree, x)
    _agree(served, qat_logits)
    acc = float(jnp.mean(jnp.argmax(served, -1) == y))
    assert acc > 0.8, acc


def test_cnn_int4_weights_int8_activations_lsq():
    """QAT of a CNN with int4 conv weights (per output channel, learned LSQ scales) and int8
    activations; the served int4 x int8 model reproduces the QAT forward pass."""
    policy = jaxq.Policy((jaxq.Rule("kernel", weight="int4", activation=A8),))
    x, y = cnn_task(64)
    v, scales, losses = train(CNN(), policy, x, y, steps=30, lsq=True, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    served_tree = jit_quantize(v, policy, scales)
    conv = served_tree["params"]["Conv_1"]["kernel"]
    assert conv.format == "int4" and conv.meta.act_spec is not None and conv.values.shape == (3, 3, 4, 8)
    qat_logits = jax.jit(CNN().apply)(qat_params(v, policy, scales), x)
    served = jax.jit(CNN().apply)(served_tree, x)
    _agree(served, qat_logits)


def test_cnn_per_group_conv_qat_matches_serving():
    """Sub-channel (per-group along input channels) int4 conv kernels with int8 activations:
    the QAT forward pass equals the served one (QAT training itself: the test above)."""
    wspec = jaxq.QuantSpec("int4", granularity="per_group", group_size=4)
    policy = jaxq.Policy((jaxq.Rule("Conv_1/kernel", weight=wspec, activation=A8),
                          jaxq.Rule("kernel", weight="int4", activation=A8)))
    x, y = cnn_task(32)
    v = jax.jit(CNN().init)(KEY, x[:1])
    served_tree = jit_quantize(v, policy)
    assert served_tree["params"]["Conv_1"]["kernel"].scale.shape == (1, 1, 2, 8)  # 8 in-channels / 4
    qat_logits = jax.jit(CNN().apply)(qat_params(v, policy), x)
    _agree(jax.jit(CNN().apply)(served_tree, x), qat_logits)


def test_nnx_qat_through_split_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
            self.out = nnx.Linear(8 * 8 * 8, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

    x, y = cnn_task(32)
    model = Net(nnx.Rngs(KEY))
    graphdef, params = nnx.split(model, nnx.Param)
    policy = jaxq.Policy((jaxq.Rule("kernel", weight="int4", activation=A8),))

    def forward(p):
        return nnx.merge(graphdef, p)(x)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(forward(qat_params(p, policy)), y).mean()

    g = jax.jit(jax.grad(loss))(params)
    assert float(jnp.max(jnp.abs(g["conv"]["kernel"].get_value()))) > 0
    qat_logits = jax.jit(lambda p: forward(qat_params(p, policy)))(params)
    served = jax.jit(forward)(jit_quantize(params, policy))
    _agree(served, qat_logits)
