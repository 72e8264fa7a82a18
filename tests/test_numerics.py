"""Numerics: round-trip bounds, exact zero, idempotence (property-based), SQNR floors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from jaxq import QuantSpec
from jaxq.numerics import codec, ranges
from jaxq.numerics.packing import pack_int4, unpack_int4

INT_FORMATS = ["int8", "int4", "int3", "int2"]


def sqnr_db(x, y):
    x = np.asarray(x, np.float64)
    return 10 * np.log10(np.sum(x**2) / np.sum((x - np.asarray(y, np.float64)) ** 2))


@st.composite
def tensor_and_spec(draw, formats=tuple(INT_FORMATS)):
    """A random tensor with a matching spec: rank 1-3, any channel axis, groups dividing the axis."""
    rank = draw(st.integers(1, 3))
    shape = [draw(st.sampled_from([4, 8])) for _ in range(rank)]  # few shapes: compile caches hit
    fmt = draw(st.sampled_from(formats))
    symmetric = draw(st.booleans()) if jaxq.numerics.get_format(fmt).kind == "int" else True
    gran = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"] if rank >= 2 else ["per_tensor", "per_channel"]))
    kw = {}
    if gran == "per_channel":
        kw["channel_axes"] = (draw(st.integers(-rank, rank - 1)),)
    if gran == "per_group":
        g_axis = draw(st.integers(0, rank - 1))
        n = shape[g_axis]
        kw["group_size"] = draw(st.sampled_from([d for d in (1, 2, 4, 8) if n % d == 0]))
        kw["group_axis"] = g_axis
        others = [a for a in range(rank) if a != g_axis]
        kw["channel_axes"] = (others[-1],) if others else ()
    if symmetric and jaxq.numerics.get_format(fmt).kind == "int":
        kw["full_range"] = draw(st.booleans())
    spec = QuantSpec(fmt, granularity=gran, symmetric=symmetric, **kw)
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale
    return x, spec


@settings(max_examples=40, deadline=None)
@given(tensor_and_spec())
def test_round_trip_error_within_half_step(case):
    x, spec = case
    q = jaxq.quantize_array(jnp.asarray(x), spec)
    y = np.asarray(q.dequantize())
    # The step is the scale (absmax/minmax ranges clip nothing), broadcast to x.
    step = np.asarray(q.meta.tiling.broadcast_scale(q.scale, x.shape))
    assert np.all(np.abs(x - y) <= 0.5 * step * (1 + 1e-5) + 1e-7 * np.abs(x))


@settings(max_examples=30, deadline=None)
@given(tensor_and_spec(formats=("int8", "int4", "int3", "int2", "nf4", "fp8_e4m3", "fp8_e5m2")))
def test_requantize_is_identity(case):
    x, spec = case
    # A full-range grid is not a fixed point of absmax recalibration: its dequantized absmax is
    # 7 or 8 steps, which maps onto 7.5 again at a different scale. Narrow grids are.
    spec = spec.replace(full_range=False) if spec.full_range else spec
    q1 = jaxq.quantize_array(jnp.asarray(x), spec)
    y1 = q1.dequantize()
    y2 = jaxq.quantize_array(y1, spec).dequantize()
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-6, atol=1e-6 * float(np.abs(x).max()))


@settings(max_examples=30, deadline=None)
@given(tensor_and_spec(formats=("int8", "int4", "int3", "int2", "nf4", "fp8_e4m3")))
def test_zero_maps_to_zero(case):
    x, spec = case
    x = x.copy()
    x.flat[:: 3] = 0.0
    y = np.asarray(jaxq.quantize_array(jnp.asarray(x), spec).dequantize())
    assert np.all(y[x == 0.0] == 0.0)


def test_all_zero_tensor_has_no_nan():
    for fmt in ["int8", "int4", "nf4", "fp8_e4m3", "int2"]:
        for sym in ([True, False] if fmt.startswith("int") else [True]):
            for method in ["absmax", "percentile", "mse"]:
                spec = QuantSpec(fmt, "per_group", 4, symmetric=sym, range_method=method)
                y = jaxq.quantize_array(jnp.zeros((8, 4)), spec).dequantize()
                assert np.all(np.asarray(y) == 0.0), (fmt, sym, method)


def test_pack_unpack_roundtrip_all_codes():
    codes = jnp.arange(-8, 8, dtype=jnp.int8)
    grid = jnp.stack(jnp.meshgrid(codes, codes), -1).reshape(-1, 2).T  # every pair of nibbles
    packed = pack_int4(grid, axis=0)
    assert packed.shape == (1, 256) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, axis=0)), np.asarray(grid))
    # Low nibble holds the even element.
    assert int(pack_int4(jnp.array([3, -2], jnp.int8), 0)[0]) == np.int8(np.uint8(0xE3))


def test_int_ranges():
    f = jaxq.numerics.get_format
    assert f("int8").int_range(True) == (-127, 127) and f("int8").int_range(False) == (-128, 127)
    assert f("int4").int_range(True) == (-7, 7) and f("int2").int_range(False) == (-2, 1)
    assert f("int4").int_range(True, full_range=True) == (-8, 7)
    assert f("int4").symmetric_bound(True) == 7.5 and f("int4").symmetric_bound(False) == 7.0


def test_full_range_defaults_and_validation():
    assert QuantSpec("int4").full_range and QuantSpec("int3").full_range and QuantSpec("int2").full_range
    assert not QuantSpec("int8").full_range
    assert not QuantSpec("int4", symmetric=False, full_range=True).full_range  # asymmetric: all codes anyway
    assert QuantSpec("int8", full_range=True).full_range
    assert not QuantSpec("int4", full_range=False).full_range
    with pytest.raises(ValueError, match="full_range applies to int formats"):
        QuantSpec("fp8", full_range=True)
    with pytest.raises(ValueError, match="narrow int8 grid"):
        from jaxq.ops.activations import check_activation_spec

        check_activation_spec(QuantSpec("int8", "per_token", full_range=True))


@pytest.mark.parametrize("fmt,levels", [("int4", 16), ("int3", 8), ("int2", 4)])
def test_full_range_uses_every_code_and_beats_narrow(fmt, levels):
    w = jax.random.normal(jax.random.key(1), (1024, 64), jnp.float32)
    full, narrow = QuantSpec(fmt, "per_group", 64), QuantSpec(fmt, "per_group", 64, full_range=False)
    q = jaxq.quantize_array(w, full)
    codes = np.asarray(jaxq.numerics.packing.unpack_codes(q.values, q.meta.pack_axis, q.meta.fmt.pack_codes)
                       if q.meta.pack_axis is not None else q.values)
    assert len(np.unique(codes)) == levels and codes.min() == -(levels // 2) and codes.max() == levels // 2 - 1
    # Absmax maps onto qmax + 0.5: nothing is off by more than half a step.
    step = np.asarray(q.meta.tiling.broadcast_scale(q.scale, w.shape))
    assert np.all(np.abs(np.asarray(w) - np.asarray(q.dequantize())) <= 0.5 * step * (1 + 1e-5))
    assert _sqnr(w, full) > _sqnr(w, narrow) + 0.3


@pytest.fixture(scope="module")
def gaussian_4096():
    return jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)


def _sqnr(w, spec):
    return sqnr_db(w, jaxq.quantize_array(w, spec).dequantize())


def test_sqnr_int8_per_channel(gaussian_4096):
    assert _sqnr(gaussian_4096, QuantSpec("int8")) >= 36.0


def test_sqnr_int4_g128_absmax_and_mse(gaussian_4096):
    absmax = _sqnr(gaussian_4096, QuantSpec("int4", "per_group", 128))
    mse = _sqnr(gaussian_4096, QuantSpec("int4", "per_group", 128, range_method="mse"))
    assert absmax >= 16.5
    assert mse > absmax + 0.1


def test_sqnr_nf4_beats_int4_g64(gaussian_4096):
    nf4 = _sqnr(gaussian_4096, QuantSpec("nf4", "per_group", 64))
    int4 = _sqnr(gaussian_4096, QuantSpec("int4", "per_group", 64))
    assert nf4 > int4


def test_percentile_clips_outliers():
    x = jnp.concatenate([jax.random.normal(jax.random.key(1), (1000,)), jnp.array([100.0])])
    lo, hi = ranges.percentile(x, (0,), 99.0, symmetric=True)
    assert float(hi[0]) < 5.0 and float(lo[0]) == -float(hi[0])


def test_mse_search_never_worse_than_absmax():
    x = jax.random.normal(jax.random.key(2), (64, 32))
    fmt = jaxq.numerics.get_format("int3")
    lo, hi = ranges.absmax(x, (0,))
    lo2, hi2 = ranges.mse_search(x, (0,), fmt, True)
    e1 = jnp.sum((x - codec.fake_quantize(x, lo, hi, fmt, True)) ** 2, 0)
    e2 = jnp.sum((x - codec.fake_quantize(x, lo2, hi2, fmt, True)) ** 2, 0)
    assert bool(jnp.all(e2 <= e1 + 1e-6))


def test_int2_packs_four_per_byte():
    codes = jnp.array(np.random.default_rng(0).integers(-2, 2, (12, 5)), jnp.int8)
    from jaxq.numerics.packing import pack_int2, unpack_int2

    packed = pack_int2(codes, 0)
    assert packed.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(unpack_int2(packed, 0)), np.asarray(codes))
    q = jaxq.quantize_array(jax.random.normal(jax.random.key(0), (64, 32)), QuantSpec("int2"))
    assert q.values.shape == (16, 32) and q.shape == (64, 32)
    assert q.nbytes == 64 * 32 // 4 + 32 * 4  # codes at 2 bits + one f32 scale per channel


def test_int3_packs_eight_per_three_bytes():
    from jaxq.numerics.packing import pack_int3, unpack_int3

    # Every code in every slot, along a middle axis.
    codes = jnp.asarray(np.random.default_rng(0).integers(-4, 4, (3, 64, 5)), jnp.int8)
    packed = pack_int3(codes, 1)
    assert packed.shape == (3, 24, 5) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(unpack_int3(packed, 1)), np.asarray(codes))
    # Bit layout: element j of a group of eight sits in bits 3j..3j+2 of a little-endian word.
    one = pack_int3(jnp.array([1, -1, 0, 0, 0, 0, 0, -4], jnp.int8), 0)
    word = int.from_bytes(np.asarray(one).astype(np.uint8).tobytes(), "little")
    assert word == 1 | (7 << 3) | (4 << 21)
    q = jaxq.quantize_array(jax.random.normal(jax.random.key(0), (128, 32)), QuantSpec("int3", "per_group", 64))
    assert q.values.shape == (48, 32) and q.shape == (128, 32)
    assert q.nbytes == 128 * 32 * 3 // 8 + 2 * 32 * 4  # codes at 3 bits + two f32 scales per column
    assert q.codes.shape == (128, 32) and int(q.codes.min()) == -4 and int(q.codes.max()) == 3
