"""Mixed precision (compute / param / output dtypes) and fp16 dynamic loss scaling.

Tolerances: bf16 compute vs fp32 on a small MLP, ``<= 3e-2 * max|y|`` (bf16 keeps 8
significant bits; a two-layer net accumulates a few roundings); fp16 vs fp32
``<= 5e-3 * max|y|``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxq
from jaxq.flax import DynamicLossScale, MixedPrecision, loss_scaled, scaled_train_step
from jaxq.flax import linen as nn

KEY = jax.random.key(0, impl="rbg")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


def normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_policy_is_frozen_and_validated():
    mp = MixedPrecision.preset("bf16")
    assert (mp.compute_dtype, mp.param_dtype, mp.output_dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    assert MixedPrecision.preset("fp16").needs_loss_scaling and not mp.needs_loss_scaling
    with pytest.raises(Exception):
        mp.compute_dtype = jnp.float32
    with pytest.raises(ValueError, match="floating"):
        MixedPrecision(compute_dtype="int8")
    with pytest.raises(ValueError, match="preset"):
        MixedPrecision.preset("fp12")


@pytest.mark.parametrize("preset,tol", [("bf16", 3e-2), ("fp16", 5e-3)])
def test_low_precision_compute_with_fp32_master_weights(preset, tol):
    mp = MixedPrecision.preset(preset)
    x = normal((8, 16))
    v = jax.jit(MLP().init)(KEY, x)
    y32 = jax.jit(MLP().apply)(v, x)

    def loss(v):
        return jnp.mean(mp.apply(MLP().apply)(v, x) ** 2)

    y = jax.jit(mp.apply(MLP().apply))(v, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y32, atol=tol * float(jnp.max(jnp.abs(y32))))
    # the computation really ran in low precision
    eqns = jax.make_jaxpr(mp.apply(MLP().apply))(v, x).jaxpr.eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2 and all(i.aval.dtype == mp.compute_dtype for e in dots for i in e.invars)
    grads = jax.jit(jax.grad(loss))(v)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # master weights stay fp32
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_mixed_precision_with_quantized_params():
    """QArray leaves are not copied; only their logical dtype changes so the ops compute in bf16."""
    mp = MixedPrecision.preset("bf16")
    x = normal((8, 16))
    v = jax.jit(MLP().init)(KEY, x)
    q = jax.jit(lambda v: jaxq.quantize(v, "int8"))(v)
    qc = mp.cast_to_compute(q)
    k, kc = q["params"]["Dense_0"]["kernel"], qc["params"]["Dense_0"]["kernel"]
    assert kc.values is k.values and kc.dtype == jnp.bfloat16
    y = jax.jit(mp.apply(MLP().apply))(q, x)
    y32 = jax.jit(MLP().apply)(q, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y32, atol=3e-2 * float(jnp.max(jnp.abs(y32))))


def test_loss_scale_skips_nonfinite_steps_halves_and_grows():
    ls = DynamicLossScale(initial_scale=2.0**10, growth_interval=3)
    opt = loss_scaled(optax.sgd(0.5), ls)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    update = jax.jit(opt.update)

    def step(grad, params, state):
        updates, state = update({"w": grad * state.loss_scale.scale}, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(jnp.ones(3), params, state)
    np.testing.assert_allclose(params["w"], 0.5)
    assert float(state.loss_scale.scale) == 2.0**10 and int(state.loss_scale.good_steps) == 1

    before = params["w"]
    params, state = step(jnp.array([jnp.inf, 1.0, 1.0]), params, state)  # overflow: skipped
    np.testing.assert_array_equal(params["w"], before)
    assert float(state.loss_scale.scale) == 2.0**9 and int(state.loss_scale.good_steps) == 0
    params, state = step(jnp.array([jnp.nan, 1.0, 1.0]), params, state)  # NaN: skipped too
    np.testing.assert_array_equal(params["w"], before)
    assert float(state.loss_scale.scale) == 2.0**8

    for i in range(3):  # three good steps in a row: the scale doubles
        params, state = step(jnp.full(3, 0.1), params, state)
    assert float(state.loss_scale.scale) == 2.0**9 and int(state.loss_scale.good_steps) == 0
    np.testing.assert_allclose(params["w"], before - 3 * 0.05, rtol=1e-6)


def test_inner_optimizer_state_is_kept_on_skipped_steps():
    opt = loss_scaled(optax.adam(1e-2), DynamicLossScale(initial_scale=4.0))
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones(2) * 4.0}, state, params)
    _, skipped = opt.update({"w": jnp.array([jnp.inf, 0.0])}, state, params)
    for a, b in zip(jax.tree.leaves(skipped.inner), jax.tree.leaves(state.inner)):
        np.testing.assert_array_equal(a, b)


def test_fp16_training_with_loss_scaling_recovers_from_overflow():
    """An fp16 model with an absurd initial scale overflows, skips, backs off, then trains."""
    mp = MixedPrecision.preset("fp16")
    x = normal((64, 16), seed=1)
    y = jnp.argmax(x @ normal((16, 4), seed=2), -1)
    v = jax.jit(MLP().init)(KEY, x[:1])
    opt = loss_scaled(optax.adam(1e-2), DynamicLossScale(initial_scale=2.0**40, growth_interval=1000))
    state = opt.init(v)

    def loss_fn(v):
        logits = mp.apply(MLP().apply)(v, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    step = jax.jit(lambda v, s: scaled_train_step(loss_fn, opt, v, s))
    finite, losses = [], []
    for _ in range(60):
        v, state, loss, ok = step(v, state)
        finite.append(bool(ok))
        losses.append(float(loss))
    assert not finite[0] and all(finite[-20:])
    assert float(state.loss_scale.scale) < 2.0**40
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
    assert losses[-1] < 0.6 * losses[finite.index(True)]
