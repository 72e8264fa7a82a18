"""XLA paths of the quantized ops against plain-jnp references on the dequantized weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import QuantSpec
from jaxq.ops import conv_general_dilated, dot_general, einsum, qmatmul

A8 = QuantSpec("int8", granularity="per_token")
DN = (((1,), (0,)), ((), ()))


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.abs(y - ref).mean() / np.abs(ref).mean()


@pytest.fixture(scope="module")
def w():
    return jax.random.normal(jax.random.key(1), (256, 48))


SPECS = [
    QuantSpec("int8"),
    QuantSpec("int8", symmetric=False),
    QuantSpec("int4"),
    QuantSpec("int4", "per_group", 64),
    QuantSpec("int4", "per_group", 32, symmetric=False),
    QuantSpec("int3", "per_group", 64),
    QuantSpec("nf4", "per_group", 64),
    QuantSpec("fp8_e4m3"),
    QuantSpec("bf16"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}-{s.group_size}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("m", [1, 100])
def test_weight_only_matches_dequantized_reference(w, spec, m):
    q = jaxq.quantize_array(w, spec)
    x = jax.random.normal(jax.random.key(m), (m, 256))
    ref = x @ q.dequantize()
    assert rel_err(qmatmul(x, q), ref) < 1e-5


@pytest.mark.parametrize("m", [1, 16, 100])
def test_bf16_activations(w, m):
    q = jaxq.quantize_array(w, QuantSpec("int4", "per_group", 64))
    x = jax.random.normal(jax.random.key(0), (m, 256)).astype(jnp.bfloat16)
    y = qmatmul(x, q)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, x.astype(jnp.float32) @ q.dequantize()) < 1e-2


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", "per_group", 64), QuantSpec("int8", symmetric=False)], ids=str)
def test_w8a8_int32_accumulation_is_exact(w, spec):
    q = jaxq.quantize_array(w, spec)
    x = jax.random.normal(jax.random.key(3), (9, 256))
    xq, xs = jaxq.ops.quantize_activation(x, A8)
    # Reference in exact integer arithmetic (numpy int64), then the scales.
    codes = np.asarray(q.codes, np.int64)
    xi = np.asarray(xq, np.int64)
    zp = 0 if q.zero_point is None else np.asarray(q.zero_point, np.float64)
    if q.meta.tiling.group_size:
        g = q.meta.tiling.group_size
        acc = np.einsum("mGg,GgN->mGN", xi.reshape(9, -1, g), codes.reshape(-1, g, 48)).astype(np.float64)
        acc -= xi.reshape(9, -1, g).sum(2)[..., None] * zp
        ref = (acc * np.asarray(q.scale, np.float64)).sum(1) * np.asarray(xs, np.float64)
    else:
        acc = (xi @ codes).astype(np.float64) - xi.sum(1, keepdims=True) * zp
        ref = acc * np.asarray(xs, np.float64) * np.asarray(q.scale, np.float64)
    y = qmatmul(x, q, act_spec=A8)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-6, atol=1e-4)


def test_w8a8_jaxpr_has_int8_dot_int32():
    q = jaxq.quantize({"w": jax.random.normal(jax.random.key(0), (64, 32))}, "w8a8")["w"]
    jaxpr = jax.make_jaxpr(lambda x: qmatmul(x, q))(jnp.ones((4, 64)))
    dots = [e for e in jaxpr.jaxpr.eqns[0].params["call_jaxpr"].eqns if e.primitive.name == "dot_general"]
    assert dots, jaxpr
    assert all(v.aval.dtype == jnp.int8 for v in dots[0].invars)
    assert dots[0].params["preferred_element_type"] == jnp.int32


def test_static_activation_scale(w):
    q = jaxq.quantize_array(w, QuantSpec("int8"))
    x = jax.random.normal(jax.random.key(4), (5, 256))
    spec = QuantSpec("int8", "per_tensor")
    y = qmatmul(x, q, act_spec=spec, act_scale=jnp.float32(0.05))
    xq = jnp.clip(jnp.round(x / 0.05), -127, 127) * 0.05
    assert rel_err(y, xq @ q.dequantize()) < 1e-5


def test_gradient_goes_through_dequantized_weight(w):
    q = jaxq.quantize_array(w, QuantSpec("int4", "per_group", 64))
    x = jax.random.normal(jax.random.key(5), (3, 256))
    for act in (None, A8):
        g = jax.grad(lambda x: jnp.sum(jnp.sin(qmatmul(x, q, act_spec=act))))(x)
        y = x @ q.dequantize() if act is None else qmatmul(x, q, act_spec=act)
        ref = jnp.cos(y) @ q.dequantize().T
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_dot_general_dense_general_kernel():
    w3 = jax.random.normal(jax.random.key(6), (64, 4, 8))
    x = jax.random.normal(jax.random.key(7), (2, 3, 64))
    for policy in ("int8", "int4", "w8a8"):
        q = jaxq.quantize({"w": w3}, policy)["w"]
        y = dot_general(x, q, (((2,), (0,)), ((), ())))
        ref = jnp.einsum("btk,khd->bthd", x, q.dequantize())
        tol = 2e-2 if policy == "w8a8" else 1e-5
        assert y.shape == (2, 3, 4, 8) and rel_err(y, ref) < tol, policy


def test_dot_general_plain_arrays_pass_through():
    x, w2 = jnp.ones((2, 3)), jnp.ones((3, 4))
    np.testing.assert_array_equal(np.asarray(dot_general(x, w2, DN)), np.asarray(jax.lax.dot_general(x, w2, DN)))


def test_einsum_with_qarray():
    w = jax.random.normal(jax.random.key(8), (16, 8))
    q = jaxq.quantize_array(w, QuantSpec("int8"))
    x = jax.random.normal(jax.random.key(9), (4, 16))
    assert rel_err(einsum("bk,kn->bn", x, q), x @ q.dequantize()) < 1e-6


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4"), QuantSpec("int4", "per_group", 8)], ids=str)
def test_conv_weight_only_and_w8a8(spec):
    x = jax.random.normal(jax.random.key(10), (2, 8, 8, 16))
    wc = jax.random.normal(jax.random.key(11), (3, 3, 16, 24))
    q = jaxq.quantize_array(wc, spec)
    dn = ("NHWC", "HWIO", "NHWC")
    ref = jax.lax.conv_general_dilated(x, q.dequantize(), (1, 1), "SAME", dimension_numbers=dn)
    y = conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=dn)
    assert rel_err(y, ref) < 1e-5
    y8 = conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=dn, act_spec=A8)
    assert rel_err(y8, ref) < 2e-2
    g = jax.grad(lambda x: conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=dn, act_spec=A8).sum())(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))


def test_w8a8_rejects_non_int_weights(w):
    q = jaxq.quantize_array(w, QuantSpec("nf4", "per_group", 64))
    with pytest.raises(ValueError, match="W8A8 needs integer weights"):
        qmatmul(jnp.ones((1, 256)), q, act_spec=A8)


def test_w8a8_conv_forward_is_one_int8_convolution():
    x = jax.random.normal(jax.random.key(12), (1, 8, 8, 16))
    q = jaxq.quantize({"w": jax.random.normal(jax.random.key(13), (3, 3, 16, 8))}, "w8a8")["w"]
    jaxpr = jax.make_jaxpr(lambda x: conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x)
    inner = jaxpr.jaxpr.eqns[0].params["call_jaxpr"].eqns
    convs = [e for e in inner if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 1  # no float convolution on a dequantized copy in the forward pass
    assert [v.aval.dtype for v in convs[0].invars] == [jnp.int8, jnp.int8]
    assert convs[0].params["preferred_element_type"] == jnp.int32
