"""Pallas kernels against plain numpy references.

On CPU every kernel runs in interpret mode in both layouts (GPU-style: K loop
inside the kernel, split-K; TPU-style: K as a sequential grid axis). On a GPU
the same cases run the compiled Triton kernels, on a TPU the compiled Mosaic
ones (``scripts/device_check.sh``). Shapes are deliberately not block multiples
(M = 1, 5, 37; K = 96 ... 256; N = 72) so padding and edge tiles are exercised.

Criteria: the int32 accumulator is bit-exact; everything after the epilogue
has a relative mean error ``|y - ref|.mean() / |ref|.mean() <= 1e-3`` against a
float64 reference rounded to the output dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxq.kernels import (
    BlockConfig,
    w4a16_matmul,
    w8a8_matmul,
    w8a8_matmul_dynamic,
    w8a8_matmul_int32,
    w8a16_matmul,
)
from jaxq.kernels import block_tables, dispatch
from jaxq.kernels.plan import make_plan
from jaxq.numerics.packing import pack_int4

TOL = 1e-3
BACKEND = jax.default_backend()


def _modes():
    """(target, interpret) pairs for this machine: compiled where the hardware exists."""
    if BACKEND in ("gpu", "cuda", "rocm"):
        return [pytest.param(("gpu", False), id="gpu-compiled")]
    if BACKEND == "tpu":
        return [pytest.param(("tpu", False), id="tpu-compiled")]
    return [pytest.param(("gpu", True), id="gpu-interpret"), pytest.param(("tpu", True), id="tpu-interpret")]


MODES = _modes()


def _cfg(target: str, *, split: int = 1, bk: int | None = None) -> BlockConfig:
    # Small blocks: interpret mode costs per grid step and per traced op, not per FLOP.
    if target == "gpu":
        return BlockConfig(16, 32, bk or 32, split_k=split, num_warps=4, num_stages=2)
    return BlockConfig(32, 128, bk or 256)


def _call(fn, *args, target, interpret, **kw):
    """Runs a kernel; a compiled layout the GPU kernel cannot lower (tiny int4 groups) is skipped."""
    try:
        return np.asarray(fn(*args, target=target, interpret=interpret, **kw).astype(jnp.float32))
    except NotImplementedError as e:
        if interpret:
            raise
        pytest.skip(str(e))


# --- data -----------------------------------------------------------------------------
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _codes(rng, shape, bits: int, symmetric: bool = True) -> np.ndarray:
    hi = 2 ** (bits - 1) - 1
    lo = -hi if symmetric else -hi - 1
    return rng.integers(lo, hi + 1, shape).astype(np.int8)


def _weights(rng, k, n, bits, group, symmetric=True):
    """Codes (K, N), stored values (packed for int4), scale (G, N), zero point or None."""
    codes = _codes(rng, (k, n), bits, symmetric)
    groups = k // group if group else 1
    scale = rng.uniform(0.005, 0.05, (groups, n)).astype(np.float32)
    zp = None if symmetric else _codes(rng, (groups, n), bits, True).astype(np.float32)
    stored = np.asarray(pack_int4(jnp.asarray(codes), -2)) if bits == 4 else codes
    return codes, stored, scale, zp


def _dequant(codes, scale, zp) -> np.ndarray:
    k, n = codes.shape
    g = k // scale.shape[0]
    c = codes.astype(np.float64).reshape(-1, g, n)
    if zp is not None:
        c = c - zp.astype(np.float64)[:, None, :]
    return (c * scale.astype(np.float64)[:, None, :]).reshape(k, n)


def _quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8 (absmax / 127, ties to even), in float32 like jaxq's codec."""
    x32 = x.astype(np.float32)
    s = (np.abs(x32).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    s = np.where(s > 1e-30, s, np.float32(1))
    q = np.clip(np.round(x32 / s), -127, 127).astype(np.int8)
    return q, s


def _rel_err(y: np.ndarray, ref: np.ndarray, out_dtype) -> float:
    ref = ref.astype(np.float32).astype(out_dtype).astype(np.float64)  # same output rounding
    return float(np.abs(y.astype(np.float64) - ref).mean() / np.abs(ref).mean())


def _j(a):
    return None if a is None else jnp.asarray(a)


# --- W8A8: the int32 accumulator is bit-exact ------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "m,k,n,bits,split",
    [(1, 96, 72, 8, 1), (37, 200, 72, 8, 2), (5, 256, 72, 4, 1)],
)
def test_w8a8_int32_bit_exact(mode, m, k, n, bits, split):
    target, interpret = mode
    rng = _rng(1, m, k, bits)
    x = _codes(rng, (m, k), 8)
    codes, stored, _, _ = _weights(rng, k, n, bits, None)
    y = w8a8_matmul_int32(jnp.asarray(x), jnp.asarray(stored), packed=bits == 4,
                          config=_cfg(target, split=split, bk=64 if bits == 4 else None),
                          target=target, interpret=interpret)
    assert y.dtype == jnp.int32 and y.shape == (m, n)
    ref = x.astype(np.int64) @ codes.astype(np.int64)
    np.testing.assert_array_equal(np.asarray(y), ref)


def test_w8a8_int32_extreme_codes_no_overflow():
    """All codes at +-127 over K = 512: the accumulator needs more than 16 bits."""
    x = np.full((3, 512), 127, np.int8)
    w = np.full((512, 40), -127, np.int8)
    target, interpret = MODES[0].values[0]
    y = w8a8_matmul_int32(jnp.asarray(x), jnp.asarray(w), config=_cfg(target), target=target, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(y), np.full((3, 40), -127 * 127 * 512))


# --- W8A8 with the epilogue -----------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "m,k,n,bits,group,symmetric,out_dtype",
    [
        (1, 200, 72, 8, None, True, jnp.float32),  # per channel, M = 1
        (37, 96, 72, 8, 32, True, jnp.bfloat16),  # per group 32
        (5, 256, 72, 8, 128, True, jnp.float32),  # per group 128
        (16, 192, 72, 4, 64, False, jnp.bfloat16),  # W4A8, asymmetric int4, group 64
    ],
)
def test_w8a8_epilogue(mode, m, k, n, bits, group, symmetric, out_dtype):
    target, interpret = mode
    rng = _rng(2, m, k, bits)
    xq, xs = _quantize_rows(rng.standard_normal((m, k)).astype(np.float32))
    codes, stored, scale, zp = _weights(rng, k, n, bits, group, symmetric)
    y = _call(w8a8_matmul, jnp.asarray(xq), jnp.asarray(stored), jnp.asarray(xs), jnp.asarray(scale), _j(zp),
              packed=bits == 4, out_dtype=out_dtype, config=_cfg(target, bk=64 if bits == 4 else None),
              target=target, interpret=interpret)
    ref = (xq.astype(np.float64) * xs) @ _dequant(codes, scale, zp)
    assert y.shape == (m, n)
    assert _rel_err(y, ref, out_dtype) <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "m,k,n,bits,group,split",
    [(37, 200, 72, 8, None, 1), (5, 256, 72, 4, 64, 2)],
)
def test_w8a8_dynamic_matches_quantize_then_matmul(mode, m, k, n, bits, group, split):
    """Fused per-token quantization gives the codes jaxq's activation quantizer gives."""
    target, interpret = mode
    rng = _rng(3, m, k, bits)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10, (m, 1)).astype(np.float32)
    x[0, :7] = 0.0
    codes, stored, scale, _ = _weights(rng, k, n, bits, group)
    y = _call(w8a8_matmul_dynamic, jnp.asarray(x), jnp.asarray(stored), jnp.asarray(scale),
              packed=bits == 4, out_dtype=jnp.float32, config=_cfg(target, split=split, bk=64 if bits == 4 else None),
              target=target, interpret=interpret)
    xq, xs = _quantize_rows(x)
    ref = (xq.astype(np.float64) * xs) @ _dequant(codes, scale, None)
    assert _rel_err(y, ref, np.float32) <= TOL


# --- weight-only ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "m,k,n,bits,group,symmetric,x_dtype,split",
    [
        (1, 200, 72, 8, None, True, jnp.bfloat16, 2),  # W8A16 decode, per channel, split-K
        (37, 192, 72, 8, 64, False, jnp.float32, 1),  # W8A16 asymmetric, group 64
        (5, 256, 72, 4, 128, True, jnp.bfloat16, 1),  # W4A16 group 128
        (16, 96, 72, 4, 32, False, jnp.float32, 1),  # W4A16 asymmetric, group 32
        (1, 224, 72, 4, None, False, jnp.bfloat16, 4),  # W4A16 per channel, asymmetric, decode
    ],
)
def test_weight_only(mode, m, k, n, bits, group, symmetric, x_dtype, split):
    target, interpret = mode
    rng = _rng(4, m, k, bits, int(symmetric))
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    codes, stored, scale, zp = _weights(rng, k, n, bits, group, symmetric)
    fn = w4a16_matmul if bits == 4 else w8a16_matmul
    y = _call(fn, x, jnp.asarray(stored), jnp.asarray(scale), _j(zp),
              config=_cfg(target, split=split, bk=64 if bits == 4 else None), target=target, interpret=interpret)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ _dequant(codes, scale, zp)
    assert y.shape == (m, n)
    out_dtype = ml_dtypes.bfloat16 if x_dtype == jnp.bfloat16 else np.float32
    assert _rel_err(y, ref, out_dtype) <= TOL


@pytest.mark.parametrize("mode", MODES)
def test_default_block_table(mode):
    """No explicit config: the device table (or the heuristic) picks legal blocks."""
    target, interpret = mode
    rng = _rng(5)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
    codes, stored, scale, _ = _weights(rng, 256, 72, 4, 128)
    y = _call(w4a16_matmul, x, jnp.asarray(stored), jnp.asarray(scale), target=target, interpret=interpret)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ _dequant(codes, scale, None)
    assert _rel_err(y, ref, ml_dtypes.bfloat16) <= TOL


# --- qmatmul dispatch -----------------------------------------------------------------
def _qmatmul():
    return pytest.importorskip("jaxq.ops.qmatmul").qmatmul


@pytest.mark.parametrize("wspec,act", [("int4-g64", None), ("int8", "per_token")])
def test_qmatmul_kernel_matches_xla(wspec, act):
    import jaxq
    from jaxq.spec import QuantSpec, as_spec

    qmatmul = _qmatmul()
    rng = _rng(6)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
    w = jaxq.quantize_array(jnp.asarray(rng.standard_normal((256, 72)), jnp.float32), as_spec(wspec))
    act_spec = None if act is None else QuantSpec("int8", granularity=act)
    impl = "pallas" if BACKEND in ("gpu", "cuda", "rocm", "tpu") else "interpret"

    @jax.jit
    def both(v, w):
        a = qmatmul(v, w, act_spec=act_spec, impl="xla")
        b, vjp = jax.vjp(lambda u: qmatmul(u, w, act_spec=act_spec, impl=impl), v)
        return a, b, vjp(jnp.ones_like(b))[0]

    a, b, g = both(x, w)
    assert b.shape == (2, 3, 72)
    assert float(jnp.abs(a - b).mean() / jnp.abs(a).mean()) <= TOL
    # The input gradient still flows (custom_vjp through the dequantized weights).
    assert g.shape == x.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0


def _meta(fmt: str, group: int | None = None, symmetric: bool = True):
    from jaxq.spec import QuantSpec

    spec = QuantSpec(fmt, granularity="per_group" if group else "per_channel", group_size=group, symmetric=symmetric)
    packed = spec.fmt.packed
    from jaxq.qarray import QMeta

    return QMeta(spec.fmt.name, np.dtype(np.float32), spec.tiling((256, 128)), symmetric, -2 if packed else None)


def test_auto_dispatch_is_conservative():
    from jaxq.qarray import QArray
    from jaxq.spec import QuantSpec

    # CPU: always XLA; elsewhere: XLA until a measured win is registered.
    assert dispatch.auto_impl(1, 256, 128, _meta("int4", 128), None) == "xla"
    assert dispatch.auto_impl(4096, 4096, 4096, _meta("int8"), QuantSpec("int8", granularity="per_token")) == "xla"
    nf4 = _meta("nf4", 64)
    assert dispatch.unsupported_reason(nf4, None, 256, 128) is not None
    assert dispatch.auto_impl(1, 256, 128, nf4, None) == "xla"
    reason = dispatch.unsupported_reason(_meta("int8", None, False), QuantSpec("int8", granularity="per_token"), 256, 128)
    assert "zero points" in reason
    w = QArray(jnp.zeros((128, 128), jnp.int8), jnp.ones((4, 128)), None, nf4)
    with pytest.raises(NotImplementedError, match="no Pallas kernel"):
        dispatch.run("interpret", jnp.ones((2, 256)), w, None, None, jnp.float32)


def test_kernel_under_scan_over_stacked_layers():
    """A (L, K, N) stack quantized with a layer channel axis, sliced by lax.scan, runs the kernel."""
    import jaxq
    from jaxq.spec import QuantSpec

    qmatmul = _qmatmul()
    rng = _rng(7)
    spec = QuantSpec("int4", granularity="per_group", group_size=64, channel_axes=(0, -1))
    ws = jaxq.quantize_array(jnp.asarray(rng.standard_normal((2, 128, 128)), jnp.float32), spec)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    impl = "pallas" if BACKEND in ("gpu", "cuda", "rocm", "tpu") else "interpret"

    def run(impl):
        return jax.lax.scan(lambda h, w: (qmatmul(h, w, impl=impl), None), x, ws)[0]

    a, b = jax.jit(lambda: (run("xla"), run(impl)))()
    assert float(jnp.abs(a - b).mean() / jnp.abs(a).mean()) <= TOL


def test_int8_units():
    assert block_tables.has_int8_units("NVIDIA H100 80GB HBM3") and block_tables.has_int8_units("TPU v5 lite")
    assert not block_tables.has_int8_units("TPU7x") and not block_tables.has_int8_units("Tesla V100-SXM2-16GB")


def test_registered_win_enables_kernel(monkeypatch):
    """A measured win flips auto-dispatch to the kernel, on the device it was measured on only."""
    monkeypatch.setitem(block_tables.KERNEL_WINS, "H100", [block_tables.WinRule("w4a16", 1, 16, grouped=True)])
    wins = block_tables.kernel_wins
    assert wins("w4a16", 1, 4096, 4096, True, device_kind="NVIDIA H100 80GB HBM3")
    assert not wins("w4a16", 64, 4096, 4096, True, device_kind="NVIDIA H100 80GB HBM3")
    assert not wins("w4a16", 1, 4096, 4096, False, device_kind="NVIDIA H100 80GB HBM3")
    assert not wins("w4a16", 1, 512, 4096, True, device_kind="NVIDIA H100 80GB HBM3")  # small layer
    assert not wins("w4a16", 1, 4096, 4096, True, device_kind="NVIDIA H200")


def test_compiled_kernel_refuses_cpu():
    if BACKEND != "cpu":
        pytest.skip("CPU-only check")
    x = jnp.ones((2, 64), jnp.int8)
    with pytest.raises(Exception, match="interpret"):
        w8a8_matmul_int32(x, jnp.ones((64, 32), jnp.int8), target="gpu", interpret=False)


# --- compiled lowering, checked without the hardware -----------------------------------
_S = jax.ShapeDtypeStruct


def _lowering_cases(target: str, device: str, m: int, k: int = 4096, n: int = 4096):
    """(name, fn, abstract args) for every kernel with the device table's blocks."""
    cfg = lambda kind: block_tables.block_config(kind, m, target, device_kind=device)  # noqa: E731
    kw = dict(target=target, interpret=False)
    i8, bf16, f32 = jnp.int8, jnp.bfloat16, jnp.float32
    return [
        ("w8a8", lambda x, w, s, xs: w8a8_matmul(x, w, xs, s, config=cfg("w8a8"), **kw),
         (_S((m, k), i8), _S((k, n), i8), _S((1, n), f32), _S((m, 1), f32))),
        ("w8a8-g128", lambda x, w, s, xs: w8a8_matmul(x, w, xs, s, config=cfg("w8a8"), **kw),
         (_S((m, k), i8), _S((k, n), i8), _S((k // 128, n), f32), _S((m, 1), f32))),
        ("w8a8-int32", lambda x, w: w8a8_matmul_int32(x, w, config=cfg("w8a8"), **kw), (_S((m, k), i8), _S((k, n), i8))),
        ("w8a8-dynamic", lambda x, w, s: w8a8_matmul_dynamic(x, w, s, config=cfg("w8a8"), **kw),
         (_S((m, k), bf16), _S((k, n), i8), _S((1, n), f32))),
        ("w4a8-g128-asym", lambda x, w, s, z: w8a8_matmul_dynamic(x, w, s, z, packed=True, config=cfg("w8a8"), **kw),
         (_S((m, k), bf16), _S((k // 2, n), i8), _S((k // 128, n), f32), _S((k // 128, n), f32))),
        ("w8a16", lambda x, w, s: w8a16_matmul(x, w, s, config=cfg("w8a16"), **kw),
         (_S((m, k), bf16), _S((k, n), i8), _S((1, n), f32))),
        ("w4a16-g128-asym", lambda x, w, s, z: w4a16_matmul(x, w, s, z, config=cfg("w4a16"), **kw),
         (_S((m, k), bf16), _S((k // 2, n), i8), _S((k // 128, n), f32), _S((k // 128, n), f32))),
    ]


@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize(
    "platform,target,device",
    [("cuda", "gpu", "NVIDIA H100 80GB HBM3"), ("tpu", "tpu", "TPU v5 lite"), ("tpu", "tpu", "TPU v6 lite")],
)
def test_compiled_kernels_lower(platform, target, device, m):
    """Pallas -> Triton IR / Mosaic lowering of every kernel, with real tables and shapes.

    Runs on CPU (cross-platform lowering; an abstract TPU device tells Mosaic the
    chip). It catches primitives a backend cannot lower and illegal block shapes;
    the Triton -> PTX and Mosaic -> TPU compilers only run on the hardware.
    """
    try:
        ad = jax.sharding.AbstractDevice(device_kind=device, num_cores=1, platform=platform)
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=ad)
    except (AttributeError, TypeError) as e:  # private-ish API: absent or changed in this jax
        pytest.skip(f"no abstract devices in jax {jax.__version__}: {e}")
    marker = "triton" if platform == "cuda" else "tpu_custom_call"
    with jax.sharding.use_abstract_mesh(mesh):
        for name, fn, args in _lowering_cases(target, device, m):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
            assert marker in text, name


# --- tables and plans (pure Python) ---------------------------------------------------
@pytest.mark.parametrize(
    "kind,key",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v6 lite", "TPU v6e"),
        ("TPU v5", "TPU v5p"),
        ("cpu", "cpu"),
        ("NVIDIA GeForce RTX 4090", "unknown-gpu"),
        ("TPU7x", "unknown-tpu"),
    ],
)
def test_canonical_device(kind, key):
    assert block_tables.canonical_device(kind) == key


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA RTX 6000", "TPU v5 lite", "TPU v9"])
@pytest.mark.parametrize("m", [1, 16, 128, 8192])
@pytest.mark.parametrize("kind,packed,group", [("w8a8", False, None), ("w8a16", False, 128), ("w4a16", True, 128),
                                               ("w4a16", True, 32), ("w8a8", True, 64)])
def test_plans_are_legal(device, m, kind, packed, group):
    """Every table entry fits real layer shapes within the target's tiling rules."""
    target = "tpu" if "TPU" in device else "gpu"
    k = n = 4096
    cfg = block_tables.block_config(kind, m, target, device_kind=device)
    int_dot = kind == "w8a8"
    p = make_plan(m, k, n, k // group if group else 1, packed=packed, int_dot=int_dot, x_itemsize=1 if int_dot else 2,
                  config=cfg, target=target, device_kind=device)
    assert p.mp % p.bm == 0 and p.np_ % p.bn == 0 and p.kp >= k and p.np_ >= n
    assert p.np_ == n and p.kp == k  # real layer shapes need no weight padding
    if group:
        assert p.kstep * p.g_steps == group or (p.g_steps == 1 and p.kstep == group)
    if target == "gpu":
        depth = p.kstep // (2 if packed else 1)
        assert all(block_tables_pow2(v) for v in (p.bm, p.bn, p.kstep)) and p.bm >= 16 and p.bn >= 16
        assert depth >= (32 if int_dot else 16)
        if m <= block_tables.DECODE_MAX_M:
            assert p.split >= 1 and (p.gp if p.grouped else p.g_steps * p.split) >= p.split
    else:
        assert p.bn % 128 == 0 and (p.bk // (2 if packed else 1)) % 128 == 0 and p.bm % 8 == 0


def block_tables_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0
