"""jaxq.flax.linen drop-in layers: identical to Flax on floats, quantized serving on jaxq trees.

References are independent of jaxq's ops: stock ``flax.linen`` layers applied to
``jaxq.dequantize(tree)`` (weight-only), and for W8A8 the same with the input
quantized by a plain-numpy int8 quantizer first. Tolerances:

* served vs float-on-dequantized: ``max|d| <= 2e-5 * max|y|`` (float32
  reassociation only: jaxq applies scales after the dot);
* served vs the original float model: SQNR floors per format (int8 >= 35 dB,
  int4 per-channel >= 12 dB, int4 per-group >= 16 dB, W8A8 >= 30 dB), well
  below what these random layers give (see the measured values in the asserts).
"""

from __future__ import annotations

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.errors import ScopeParamShapeError

import jaxq
from jaxq.flax import STATS, calibrate
from jaxq.flax import linen as nn

KEY = jax.random.key(0, impl="rbg")  # threefry takes seconds to compile on CPU
A8_TOKEN = jaxq.QuantSpec("int8", granularity="per_token")


def normal(shape, seed: int = 1, scale: float = 1.0):
    """Test inputs from numpy (jax.random compiles per shape, which costs seconds on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def init(layer, x, seed: int = 0):
    """Random params with the layer's param tree, without compiling Flax's initializers (slow on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(layer.init, KEY, x)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)


def quantize(v, pol):
    return jax.jit(lambda t: jaxq.quantize(t, pol))(v)


dequantize = jax.jit(jaxq.dequantize)


def sqnr_db(ref, y) -> float:
    ref, y = np.asarray(ref, np.float64), np.asarray(y, np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - y) ** 2), 1e-30)))


def fq_rows(x, axes):
    """Plain-numpy symmetric int8 fake quantization with one scale per reduction over ``axes``."""
    x = np.asarray(x, np.float32)
    s = np.max(np.abs(x), axis=axes, keepdims=True) / 127.0
    s = np.where(s > 0, s, 1.0)
    return (np.clip(np.round(x / s), -127, 127) * s).astype(np.float32)


def policy(fmt: str, act: bool = False, group_axis: int = -2):
    if fmt.startswith("int4-g"):
        spec = jaxq.QuantSpec("int4", granularity="per_group", group_size=int(fmt[6:]), group_axis=group_axis)
    else:
        spec = jaxq.QuantSpec(fmt)
    return jaxq.Policy((jaxq.Rule("kernel", weight=spec, activation=A8_TOKEN if act else None),))


# name -> (layer from module m, input shape, how the served op quantizes activations[, group axis])
LAYERS = {
    "Dense": (lambda m: m.Dense(24), (6, 32), lambda x: fq_rows(x, -1)),
    "DenseGeneral": (lambda m: m.DenseGeneral((3, 8)), (6, 32), lambda x: fq_rows(x, -1), -3),
    "DenseGeneral2": (lambda m: m.DenseGeneral(12, axis=(-2, -1)), (6, 4, 16),
                      lambda x: fq_rows(x, (-2, -1))),
    "Conv": (lambda m: m.Conv(12, (3, 3)), (2, 6, 6, 16), lambda x: fq_rows(x, None)),
    "Einsum": (lambda m: m.Einsum((4, 16, 10), "bij,ijk->bk"), (6, 4, 16), lambda x: fq_rows(x, -1)),
}


@functools.cache
def build(name):
    make, shape, fq, *_ = LAYERS[name]
    x = normal(shape)
    return make(nn), make(fnn), x, fq


@functools.cache
def jitted(name):
    """(jaxq layer apply, stock Flax apply), jitted once per layer so compilations are reused."""
    layer, ref, _, _ = build(name)
    return jax.jit(layer.apply), jax.jit(ref.apply)


@functools.cache
def float_setup(name):
    layer, _, x, _ = build(name)
    v = init(layer, x)
    return v, jitted(name)[1](v, x)


def group_axis(name):
    return LAYERS[name][3] if len(LAYERS[name]) > 3 else -2


def test_param_trees_identical_to_flax():
    """Same structure, names, shapes, dtypes and initial values as stock Flax (default initializers)."""
    for name in LAYERS:
        layer, ref, x, _ = build(name)
        v, vr = layer.init(KEY, x), ref.init(KEY, x)  # eager: the second init reuses the compiled ops
        assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(vr), name
        for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(vr)):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_float_outputs_identical_to_flax(name):
    layer, _, x, _ = build(name)
    v, y_ref = float_setup(name)
    np.testing.assert_array_equal(jitted(name)[0](v, x), y_ref)


def test_auto_names_match_flax_in_a_model():
    def model(m):
        class Net(m.Module):
            @m.compact
            def __call__(self, x):
                y = m.Conv(4, (3, 3))(x)
                y = m.relu(y).reshape(x.shape[0], -1)
                y = m.DenseGeneral((2, 4))(y)
                y = m.Einsum((2, 4, 8), "bij,ijk->bk")(y)
                return m.Dense(3)(m.Dense(5)(y))
        return Net()

    x = jnp.ones((1, 4, 4, 2))
    v, vr = jax.eval_shape(model(nn).init, KEY, x), jax.eval_shape(model(fnn).init, KEY, x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, vr)
    assert set(v["params"]) == {"Conv_0", "DenseGeneral_0", "Einsum_0", "Dense_0", "Dense_1"}


CASES = [(n, f) for n in sorted(LAYERS) for f in ("int8", "int4", "int4-g8")]
SQNR_FLOOR = {"int8": 35.0, "int4": 12.0, "int4-g8": 16.0}


@pytest.mark.parametrize("name,fmt", CASES)
def test_weight_only_serving(name, fmt):
    _, _, x, _ = build(name)
    apply, ref_apply = jitted(name)
    v, y_float = float_setup(name)
    q = quantize(v, policy(fmt, group_axis=group_axis(name)))
    kernel = q["params"]["kernel"]
    assert isinstance(kernel, jaxq.QArray) and kernel.format == fmt[:4]
    y = apply(q, x)
    y_deq = ref_apply(dequantize(q), x)
    tol = 2e-5 * float(jnp.max(jnp.abs(y_deq)))
    np.testing.assert_allclose(y, y_deq, atol=tol, rtol=0)
    assert sqnr_db(y_float, y) >= SQNR_FLOOR[fmt]


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("fmt", ["int8", "int4-g8"])
def test_w8a8_serving(name, fmt):
    _, _, x, fq = build(name)
    apply, ref_apply = jitted(name)
    v, y_float = float_setup(name)
    q = quantize(v, policy(fmt, act=True, group_axis=group_axis(name)))
    y = apply(q, x)
    if name == "DenseGeneral2" and fmt != "int8":
        fq = lambda a: fq_rows(a, -1)  # noqa: E731  (served on the dequantized path: rows = last axis)
    y_ref = ref_apply(dequantize(q), fq(x))
    np.testing.assert_allclose(y, y_ref, atol=2e-5 * float(jnp.max(jnp.abs(y_ref))), rtol=0)
    floor = 30.0 if fmt == "int8" else 15.0
    assert sqnr_db(y_float, y) >= floor


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def _int_dots(jaxpr, prim):
    return [e for e in _walk(jaxpr) if e.primitive.name == prim
            and all(v.aval.dtype == jnp.int8 for v in e.invars) and e.outvars[0].aval.dtype == jnp.int32]


def test_w8a8_dense_jaxpr_has_int8_dot_and_no_float_weight():
    layer = nn.Dense(48)
    x = jnp.ones((4, 64))
    q = quantize(init(layer, x), "w8a8")
    closed = jax.make_jaxpr(layer.apply)(q, x)
    kernel_in = [v for v in closed.jaxpr.invars if v.aval.dtype == jnp.int8]
    assert [tuple(v.aval.shape) for v in kernel_in] == [(64, 48)]
    assert len(_int_dots(closed.jaxpr, "dot_general")) == 1
    float_kernels = [v for e in _walk(closed.jaxpr) for v in e.outvars
                     if tuple(v.aval.shape) == (64, 48) and jnp.issubdtype(v.aval.dtype, jnp.floating)]
    assert float_kernels == [], "W8A8 serving must not build a float copy of the weight"


def test_int4_serving_jaxpr_takes_packed_codes():
    layer = nn.Dense(48)
    x = jnp.ones((4, 64))
    q = quantize(init(layer, x), "int4")
    closed = jax.make_jaxpr(layer.apply)(q, x)
    shapes = sorted((tuple(v.aval.shape), v.aval.dtype.name) for v in closed.jaxpr.invars)
    assert ((32, 48), "int8") in shapes  # two int4 codes per byte; no float (64, 48) input
    assert ((64, 48), "float32") not in shapes


def test_w8a8_conv_jaxpr_has_int8_conv():
    layer = nn.Conv(8, (3, 3))
    x = jnp.ones((1, 6, 6, 4))
    q = quantize(init(layer, x), "w8a8")
    closed = jax.make_jaxpr(layer.apply)(q, x)
    assert len(_int_dots(closed.jaxpr, "conv_general_dilated")) == 1


def test_packed_kernel_shape_is_checked_logically():
    layer = nn.Dense(8)
    x = jnp.ones((2, 16))
    q = quantize(init(layer, x), "int4")
    assert q["params"]["kernel"].values.shape == (8, 8)  # packed
    layer.apply(q, x)  # logical (16, 8) accepted
    with pytest.raises(ScopeParamShapeError):
        layer.apply(q, jnp.ones((2, 32)))


def test_hooks_work_on_stock_flax_layers():
    from jaxq.flax import hooks

    layer = fnn.Dense(8, dot_general=hooks.dot_general, promote_dtype=hooks.promote_dtype)
    x = normal((3, 16))
    q = quantize(init(layer, x), "w8a8")
    y = layer.apply(q, x)
    np.testing.assert_allclose(y, fnn.Dense(8).apply(dequantize(q), fq_rows(x, -1)), atol=1e-5)


class TwoPaths(nn.Module):
    """Defines ``a`` then ``b`` but calls ``b`` first: stats must follow names, not call order."""

    @nn.compact
    def __call__(self, x):
        b = nn.Dense(16, name="b")
        a = nn.Conv(4, (3, 3), name="a")
        h = b(x.reshape(x.shape[0], -1)).reshape(x.shape[0], 4, 4, 1)
        return a(h * 3.0)


def _inputs(model, v, x):
    _, state = model.apply(v, x, mutable=[STATS])
    return state


def test_calibration_stats_keyed_by_module_path_and_served():
    model = TwoPaths()
    xs = [normal((4, 2, 2, 4), seed=i, scale=i + 1) for i in range(3)]
    v = init(model, xs[0])
    stats = calibrate(model.apply, v, xs, "w8a8", method="minmax")
    assert set(stats) == {"a", "b"} and set(stats["a"]) == {"act_scale"}
    # Reference: the inputs of b and of a, computed by hand.
    in_b = [x.reshape(4, -1) for x in xs]
    in_a = [3.0 * fnn.Dense(16).apply({"params": v["params"]["b"]}, x) for x in in_b]
    np.testing.assert_allclose(stats["b"]["act_scale"], max(float(jnp.max(jnp.abs(t))) for t in in_b) / 127, rtol=1e-6)
    np.testing.assert_allclose(stats["a"]["act_scale"], max(float(jnp.max(jnp.abs(t))) for t in in_a) / 127, rtol=1e-6)

    pct = calibrate(model.apply, v, xs, "w8a8", method="percentile", percentile=90.0)
    assert float(pct["a"]["act_scale"]) < float(stats["a"]["act_scale"])

    # Serving with the frozen stats uses them: compare with a numpy static-scale reference.
    q = quantize(v, "w8a8")
    x = xs[0]
    y_static = jax.jit(model.apply)({"params": q["params"], STATS: stats}, x)
    y_dynamic = model.apply(q, x)
    sb, sa = float(stats["b"]["act_scale"]), float(stats["a"]["act_scale"])
    fq_static = lambda t, s: np.clip(np.round(np.asarray(t) / s), -127, 127) * s  # noqa: E731
    dq = dequantize(q)["params"]
    hb = fnn.Dense(16).apply({"params": dq["b"]}, fq_static(x.reshape(4, -1), sb))
    ref = fnn.Conv(4, (3, 3)).apply({"params": dq["a"]}, fq_static(3.0 * hb.reshape(4, 4, 4, 1), sa))
    np.testing.assert_allclose(y_static, ref, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
    assert float(jnp.max(jnp.abs(y_static - y_dynamic))) > 0  # the static scales are really used


def test_calibrate_rejects_weight_only_policy():
    model = TwoPaths()
    x = jnp.ones((2, 2, 2, 4))
    with pytest.raises(ValueError, match="no layer to calibrate"):
        calibrate(model.apply, init(model, x), [x], "int8")
