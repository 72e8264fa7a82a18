"""QArray through jit, vmap, grad, scan, eval_shape, and sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import QuantSpec, Rule


def _params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {
        "params": {
            "Dense_0": {"kernel": jax.random.normal(k1, (64, 32)), "bias": jnp.zeros(32)},
            "Dense_1": {"kernel": jax.random.normal(k2, (32, 16)), "bias": jnp.zeros(16)},
            "LayerNorm_0": {"scale": jnp.ones(32)},
        }
    }


def test_default_policy_quantizes_kernels_only():
    q = jaxq.quantize(_params())
    p = q["params"]
    assert isinstance(p["Dense_0"]["kernel"], jaxq.QArray) and p["Dense_0"]["kernel"].format == "int8"
    assert p["Dense_0"]["kernel"].scale.shape == (1, 32)  # per output channel
    assert not isinstance(p["Dense_0"]["bias"], jaxq.QArray)
    assert not isinstance(p["LayerNorm_0"]["scale"], jaxq.QArray)


def test_jit_matches_eager():
    params = _params()
    eager = jaxq.dequantize(jaxq.quantize(params, "int4-g32"))
    jitted = jax.jit(lambda p: jaxq.dequantize(jaxq.quantize(p, "int4-g32")))(params)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_eval_shape_plans_memory_without_computing():
    params = _params()
    abstract = jax.eval_shape(lambda p: jaxq.quantize(p, "int4-g32"), params)
    k = abstract["params"]["Dense_0"]["kernel"]
    assert isinstance(k, jaxq.QArray)
    assert k.shape == (64, 32) and k.values.shape == (32, 32) and k.values.dtype == jnp.int8
    assert k.scale.shape == (2, 32)
    real = jaxq.quantize(params, "int4-g32")
    assert jaxq.tree_nbytes(abstract) == jaxq.tree_nbytes(real)


def test_vmap_over_quantized_stack():
    w = jax.random.normal(jax.random.key(1), (4, 32, 16))
    spec = QuantSpec("int4", "per_group", 8, channel_axes=(0, -1))
    q = jaxq.quantize_array(w, spec)
    x = jax.random.normal(jax.random.key(2), (4, 5, 32))
    y = jax.vmap(lambda x, q: x @ q.dequantize())(x, q)
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.einsum("lmk,lkn->lmn", x, q.dequantize())), rtol=1e-5, atol=1e-5)
    # vmap of quantize itself gives the same codes as quantizing each slice.
    qv = jax.vmap(lambda w: jaxq.quantize_array(w, QuantSpec("int4", "per_group", 8)))(w)
    for i in range(4):
        qi = jaxq.quantize_array(w[i], QuantSpec("int4", "per_group", 8))
        np.testing.assert_array_equal(np.asarray(qv.values[i]), np.asarray(qi.values))


def test_scan_over_stacked_layers():
    layers = jax.random.normal(jax.random.key(3), (3, 16, 16)) * 0.3
    q = jaxq.quantize({"w": layers}, Rule("w", QuantSpec("int8", channel_axes=(0, -1))))["w"]
    x = jax.random.normal(jax.random.key(4), (2, 16))

    def step(h, layer):
        return jnp.tanh(jaxq.ops.qmatmul(h, layer)), None

    y, _ = jax.lax.scan(step, x, q)
    ref = x
    for i in range(3):
        ref = jnp.tanh(ref @ q.dequantize()[i])
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_grad_through_fake_quant_is_clipped_ste():
    x = jnp.linspace(-2, 2, 64).reshape(8, 8)
    g = jax.grad(lambda x: jnp.sum(jaxq.fake_quant(x, "int8") * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(g), 3.0)  # absmax range: nothing is clipped
    spec = QuantSpec("int4", "per_tensor", range_method="percentile", percentile=50.0)
    g = jax.grad(lambda x: jnp.sum(jaxq.fake_quant(x, spec)))(x)
    assert 0 < float(g.sum()) < x.size and set(np.unique(np.asarray(g))) <= {0.0, 1.0}


def test_lsq_scale_gradient_matches_definition():
    x = jnp.array([[0.26, -0.9, 3.0, 0.0]]).T  # (4, 1): one scale
    spec = QuantSpec("int4", "per_channel")
    s = jnp.array([[0.25]])
    gs = jax.grad(lambda s: jnp.sum(jaxq.fake_quant_lsq(x, s, spec, grad_scale=False)))(s)
    v = np.asarray(x[:, 0]) / 0.25
    qmin, qmax = -8, 7  # int4 defaults to the full-range grid
    expected = sum((np.round(u) - u) if qmin <= u <= qmax else (qmax if u > qmax else qmin) for u in v)
    np.testing.assert_allclose(float(gs[0, 0]), expected, rtol=1e-5)


def test_quantize_with_learned_scales_matches_lsq_forward():
    w = jax.random.normal(jax.random.key(5), (32, 8))
    spec = QuantSpec("int4", "per_group", 16)
    s, _ = jaxq.initial_scale(w, spec)
    s = s * 0.8  # as if training shrank it
    fq = jaxq.fake_quant_lsq(w, s, spec)
    q = jaxq.quantize({"k": w}, Rule("k", spec), scales={"k": s})["k"]
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(fq))


def test_device_put_and_tree_map():
    q = jaxq.quantize(_params(), "int4-g32")
    moved = jax.device_put(q, jax.devices()[0])
    assert isinstance(moved["params"]["Dense_0"]["kernel"], jaxq.QArray)
    doubled = jax.tree_util.tree_map(lambda a: a, q)
    assert jax.tree_util.tree_structure(doubled) == jax.tree_util.tree_structure(q)


SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxq
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    w = jax.device_put(jax.random.normal(jax.random.key(0), (256, 512)), NamedSharding(mesh, P("data", "model")))
    q = jaxq.quantize({"w": w}, "int4-g64")["w"]
    assert q.values.sharding.spec == P("data", "model"), q.values.sharding
    assert q.scale.shape == (4, 512) and q.scale.sharding.spec == P("data", "model"), q.scale.sharding
    q8 = jaxq.quantize({"w": w}, "int8")["w"]
    assert q8.scale.sharding.spec == P(None, "model"), q8.scale.sharding
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(jaxq.quantize({"w": np.asarray(w)}, "int4-g64")["w"].dequantize()), rtol=1e-6)
    print("SHARDING_OK")
    """
)


def test_sharded_tree_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert "SHARDING_OK" in out.stdout, out.stderr[-3000:]
