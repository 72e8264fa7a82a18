"""jaxq.flax.nnx drop-in layers: identical to flax.nnx on floats, quantized serving on jaxq state.

References: stock ``flax.nnx`` layers holding ``jaxq.dequantize(state)`` (weight-only)
and, for W8A8, the input int8-quantized by plain numpy first. Tolerances as in
test_flax_linen: ``2e-5 * max|y|`` against the dequantized float layer (scales are
applied after the dot), SQNR floors against the original float layer.
"""

from __future__ import annotations

import flax.nnx as fnnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.flax import nnx

A8_TOKEN = jaxq.QuantSpec("int8", granularity="per_token")


def normal(shape, seed: int = 1, scale: float = 1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def sqnr_db(ref, y) -> float:
    ref, y = np.asarray(ref, np.float64), np.asarray(y, np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - y) ** 2), 1e-30)))


def fq_rows(x, axes):
    x = np.asarray(x, np.float32)
    s = np.max(np.abs(x), axis=axes, keepdims=True) / 127.0
    s = np.where(s > 0, s, 1.0)
    return (np.clip(np.round(x / s), -127, 127) * s).astype(np.float32)


def rngs():
    return fnnx.Rngs(jax.random.key(0, impl="rbg"))  # threefry takes seconds to compile on CPU


# name -> (constructor from module m, input shape, served activation rows, group axis)
LAYERS = {
    "Linear": (lambda m: m.Linear(32, 24, rngs=rngs()), (6, 32), lambda x: fq_rows(x, -1), -2),
    "LinearGeneral": (lambda m: m.LinearGeneral((4, 16), 12, axis=(-2, -1), rngs=rngs()), (6, 4, 16),
                      lambda x: fq_rows(x, (-2, -1)), -2),
    "Conv": (lambda m: m.Conv(16, 12, (3, 3), rngs=rngs()), (2, 6, 6, 16), lambda x: fq_rows(x, None), -2),
    "Einsum": (lambda m: m.Einsum("bij,ijk->bk", (4, 16, 10), (10,), rngs=rngs()), (6, 4, 16),
               lambda x: fq_rows(x, -1), -2),
}


def policy(fmt: str, act: bool = False):
    if fmt.startswith("int4-g"):
        spec = jaxq.QuantSpec("int4", granularity="per_group", group_size=int(fmt[6:]))
    else:
        spec = jaxq.QuantSpec(fmt)
    return jaxq.Policy((jaxq.Rule("kernel", weight=spec, activation=A8_TOKEN if act else None),))


def quantize_model(model, pol):
    """``jaxq.flax.nnx.quantize_model`` with the tree transform jitted (eager ops compile one by one)."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.jit(lambda s: jaxq.quantize(s, pol))(state))
    return model


dequantize = jax.jit(jaxq.dequantize)


def run(model, x):
    """Jitted forward of an nnx model (split/merge, the standard functional route)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_state_and_float_outputs_identical_to_flax(name):
    make, shape, _, _ = LAYERS[name]
    x = normal(shape)
    m, ref = make(nnx), make(fnnx)
    s, sr = nnx.state(m, nnx.Param), fnnx.state(ref, fnnx.Param)
    assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(sr)
    for a, b in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(sr)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(run(m, x), run(ref, x))


FLOORS = {"int8": 35.0, "int4": 12.0, "int4-g8": 16.0}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("fmt,act", [("int8", False), ("int4-g8", False), ("int8", True)])  # int4 per channel: linen tests
def test_serving(name, fmt, act):
    make, shape, fq, _ = LAYERS[name]
    x = normal(shape)
    m = make(nnx)
    y_float = run(m, x)
    quantize_model(m, policy(fmt, act))
    kernel = m.kernel.get_value()
    assert isinstance(kernel, jaxq.QArray) and kernel.format == fmt[:4]
    y = run(m, x)
    ref = make(fnnx)
    fnnx.update(ref, dequantize(nnx.state(m, nnx.Param)))
    y_ref = run(ref, fq(x) if act else x)
    np.testing.assert_allclose(y, y_ref, atol=2e-5 * float(jnp.max(jnp.abs(y_ref))), rtol=0)
    assert sqnr_db(y_float, y) >= (30.0 if act else FLOORS[fmt])


def test_quantized_state_holds_codes_not_floats():
    m = nnx.Linear(64, 32, rngs=rngs())
    jaxq.flax.nnx.quantize_model(m, "int4")  # the library helper itself (eager)
    leaves = jax.tree_util.tree_leaves(nnx.state(m, nnx.Param))
    shapes = sorted((tuple(a.shape), a.dtype.name) for a in leaves)
    assert ((32, 32), "int8") in shapes and ((64, 32), "float32") not in shapes


def test_calibrate_stores_static_scales_by_path():
    class Net(nnx.Module):
        def __init__(self):
            self.second = nnx.Linear(8, 4, rngs=rngs())
            self.first = nnx.Linear(16, 8, rngs=rngs())

        def __call__(self, x):
            return self.second(nnx.relu(self.first(x)))

    model = Net()
    xs = [normal((5, 16), seed=i, scale=i + 1) for i in range(3)]
    quantize_model(model, "w8a8")
    scales = jaxq.flax.nnx.calibrate(model, xs)
    assert set(scales) == {"first", "second"}
    np.testing.assert_allclose(scales["first"], max(float(jnp.max(jnp.abs(x))) for x in xs) / 127, rtol=1e-6)
    assert isinstance(model.first.act_scale, jaxq.flax.nnx.ActScale)
    # the Param tree is unchanged (the scale is an ActScale variable, not a Param)
    assert "act_scale" not in nnx.state(model, nnx.Param)["first"]
    # serving now uses the static scale for the first layer's input: numpy reference
    x = xs[0]
    s1 = float(scales["first"])
    w1 = np.asarray(model.first.kernel.get_value().dequantize())
    h = np.clip(np.round(np.asarray(x) / s1), -127, 127) * s1 @ w1 + np.asarray(model.first.bias.get_value())
    h = np.maximum(h, 0)
    s2 = float(scales["second"])
    w2 = np.asarray(model.second.kernel.get_value().dequantize())
    ref = np.clip(np.round(h / s2), -127, 127) * s2 @ w2 + np.asarray(model.second.bias.get_value())
    np.testing.assert_allclose(run(model, x), ref, atol=1e-4 * np.max(np.abs(ref)))
