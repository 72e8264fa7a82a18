"""`qmatmul`: ``x @ w`` where ``w`` is a :class:`~jaxq.QArray`, on any backend.

The XLA path never materialises a float copy of the weights when it can avoid it:

* per-channel weights: ``(x @ codes) * scale`` - the scale is applied to the
  output, so XLA only converts the codes (and fuses that into the dot on GPU);
* per-group weights with few rows: partial dots per group, scaled, then summed;
  with many rows the weights are dequantized once (cheaper than M partial sums);
* W8A8: activations quantized to int8 (per token or with a static scale), an
  ``int8 x int8 -> int32`` ``dot_general``, then the scales in the epilogue.

:func:`choose_impl` picks XLA or a Pallas kernel (see ``jaxq.kernels``). The op is
differentiable: the input gradient goes through the dequantized weights (a
straight-through estimator for the activation rounding), so it serves QAT and
fine-tuning too. Weights get no gradient (they are integer codes).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.numerics import codec
from jaxq.ops.activations import check_activation_spec, quantize_activation
from jaxq.qarray import QArray, QMeta
from jaxq.spec import QuantSpec

IMPLS = ("xla", "interpret", "pallas")


def _check_weight(w: QArray, k: int) -> None:
    if not isinstance(w, QArray):
        raise TypeError(f"qmatmul expects a QArray weight, got {type(w).__name__}; use jnp.dot for float weights")
    if w.ndim != 2:
        raise ValueError(f"qmatmul expects a 2-D (K, N) weight, got shape {w.shape}")
    if w.shape[0] != k:
        raise ValueError(f"x has {k} features but the weight has shape {w.shape} (K, N); they must agree")
    t = w.meta.tiling
    # Channel axes below -ndim belong to leading axes that vmap/scan stripped off.
    chans = tuple(a for a in t.channel_axes if a >= -w.ndim)
    if w.meta.fmt.kind != "cast" and (chans not in ((), (-1,)) or t.group_axis not in (None, -2)):
        raise ValueError(
            f"qmatmul needs scales per output channel or per group along K; this weight has {t}. "
            "Dequantize it, or quantize with channel_axes=(-1,), group_axis=-2"
        )


# --- XLA paths ---------------------------------------------------------------------------
def _scaled(acc: jax.Array, sx: jax.Array | None, scale: jax.Array, w: QArray) -> jax.Array:
    """``sum_k x_k * w_kn`` from ``acc = x @ codes`` and ``sx = sum_k x_k`` (per group).

    Code-domain zero point: ``(acc - sx * zp) * scale``; value-domain (GGUF Q4_1):
    ``(acc - qmin * sx) * scale + sx * zp``.
    """
    zp = w.zero_point
    if zp is None:
        return acc * scale
    if w.meta.zero_point_domain == "value":
        qmin = w.meta.fmt.int_range(False)[0]
        return (acc - qmin * sx) * scale + sx * zp.astype(jnp.float32)
    return (acc - sx * zp) * scale


_CHUNK_ELEMENTS = 64 * 1024  # ~256 KiB of float32 per chunk: stays in L2


def _chunk_rows(w: QArray) -> int | None:
    """Rows per K-chunk for the CPU path, or None when no chunking fits."""
    k, n = w.shape
    unit = w.meta.tiling.group_size or 1
    if w.meta.pack_axis is not None:
        unit = math.lcm(unit, w.meta.fmt.pack_codes)
    target = max(unit, _CHUNK_ELEMENTS // max(n, 1))
    rows = max((r for r in range(unit, min(k, target) + 1, unit) if k % r == 0), default=None)
    return None if rows is None or rows == k else rows


def _chunked_dequant_matmul(x2: jax.Array, w: QArray, rows: int, out_dtype) -> jax.Array:
    """``x @ dequantize(w)``, dequantizing ``rows`` rows of ``w`` at a time.

    XLA:CPU does not fuse the int->float conversion into the dot, so converting the
    whole weight writes a float copy of it on every call (slower than the float
    matmul). Chunks that fit in cache make weight-only matmuls faster than float.
    """
    k, n = w.shape
    nc = k // rows
    t = w.meta.tiling
    codes, nbytes = (w.meta.fmt.pack_codes, w.meta.fmt.pack_bytes) if w.meta.pack_axis is not None else (1, 1)
    packed = codes == 2  # 4-bit: even/odd halves; int2 and int3 take the generic path
    values = w.values.reshape(nc, rows // codes * nbytes, n)

    def per_chunk(a):
        # Per-group scales are cut with the chunk; per-channel ones are shared.
        return None if a is None or t.group_size is None else a.reshape(nc, rows // t.group_size, n)

    scale_c, zp_c = per_chunk(w.scale), per_chunk(w.zero_point)
    m = x2.shape[0]
    fmt = w.meta.fmt
    domain = w.meta.zero_point_domain
    if packed:
        # Byte i holds elements 2i (low nibble) and 2i+1 (high nibble): multiply the
        # even and odd columns of x by the two halves instead of interleaving them.
        xc = x2.reshape(m, nc, rows // 2, 2).transpose(1, 3, 0, 2)  # (nc, 2, m, rows/2)
    else:
        xc = x2.reshape(m, nc, rows).transpose(1, 0, 2)

    def rows_scale(a, per_row):
        # (rows/g, N) group scales -> one row per stored row; shared scales as they are.
        if a is None or t.group_size is None:
            return a
        return jnp.repeat(a, t.group_size // per_row, axis=0)

    def body(acc, xs):
        xi, vi, si, zi = xs
        si = w.scale if si is None else si
        zi = w.zero_point if zi is None else zi
        if packed:
            sr, zr = rows_scale(si, 2), rows_scale(zi, 2)
            lo = jnp.right_shift(jnp.left_shift(vi, jnp.int8(4)), jnp.int8(4))
            hi = jnp.right_shift(vi, jnp.int8(4))
            w_lo = codec.decode(lo, sr, zr, fmt, x2.dtype, domain)
            w_hi = codec.decode(hi, sr, zr, fmt, x2.dtype, domain)
            part = jnp.dot(xi[0], w_lo, preferred_element_type=jnp.float32)
            part += jnp.dot(xi[1], w_hi, preferred_element_type=jnp.float32)
        elif codes > 1:
            chunk = QArray(vi, si, zi, w.meta).dequantize(x2.dtype)
            part = jnp.dot(xi, chunk, preferred_element_type=jnp.float32)
        else:
            sr, zr = rows_scale(si, 1), rows_scale(zi, 1)
            part = jnp.dot(xi, codec.decode(vi, sr, zr, fmt, x2.dtype, domain), preferred_element_type=jnp.float32)
        return acc + part, None

    acc0 = jnp.zeros((x2.shape[0], n), jnp.float32)
    acc, _ = jax.lax.scan(body, acc0, (xc, values, scale_c, zp_c))
    return acc.astype(out_dtype)


# Integer digits: x = sum_j s_j * q_j with int8 q_j, each digit the rounded residual of the ones
# before (the error shrinks 254x per digit; three give float32's precision). x @ codes is then
# int8 x int8 -> int32 dots, which XLA:CPU runs through its fast GEMM for two or more rows, at a
# quarter of float32's weight bytes and without converting the weights to float at all.
_DIGITS = 3
_DIGIT_MAX_ROWS = 16  # decode-sized batches; larger ones amortise one dequantization
_DIGIT_MAX_GROUPS = 32  # the block-diagonal LHS below has rows x digits x groups rows
_INT32_SAFE_K = (2**31 - 1) // (127 * 128)  # |sum_k q * c| stays below 2**31


def _int_digits(x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [M, K]`` -> int8 digits ``[D, M, K]`` and float32 scales ``[D, M, 1]``, ``x ~ sum_d s_d q_d``."""
    r = x2.astype(jnp.float32)
    qs, ss = [], []
    for _ in range(_DIGITS):
        s = jnp.max(jnp.abs(r), axis=1, keepdims=True) / 127.0
        s = jnp.where(s > 0, s, 1.0)
        q = jnp.clip(jnp.round(r / s), -127, 127)
        qs.append(q.astype(jnp.int8))
        ss.append(s)
        r = r - q * s
    return jnp.stack(qs), jnp.stack(ss)


def _digits_matmul_ok(x2: jax.Array, w: QArray) -> bool:
    t = w.meta.tiling
    k = w.shape[0]
    groups = 1 if t.group_size is None else k // t.group_size
    # Packed codes (int4 and below) stay on the chunked path: unpacking the whole weight on every
    # call costs more than the integer dot saves.
    return (jax.default_backend() == "cpu" and x2.dtype == jnp.float32 and w.meta.fmt.kind == "int"
            and w.meta.pack_axis is None and w.zero_point is None and x2.shape[0] <= _DIGIT_MAX_ROWS
            and k <= _INT32_SAFE_K and groups <= _DIGIT_MAX_GROUPS)


def _digits_matmul(x2: jax.Array, w: QArray, out_dtype) -> jax.Array:
    """``x @ dequantize(w)`` for symmetric int weights through int8 x int8 -> int32 dots.

    Per-group scales: each digit row is spread over a block-diagonal ``[rows * G, K]`` LHS (zero
    outside its group), so one 2-D integer dot gives every group's partial sum; the group scales
    multiply those, then the digits' scales combine them. Non-finite inputs propagate (a NaN or
    Inf in a row makes that output row NaN) instead of vanishing in the int8 rounding.
    """
    m, k = x2.shape
    t = w.meta.tiling
    g = t.group_size or k
    groups = k // g
    q, s = _int_digits(x2)  # [D, M, K], [D, M, 1]
    lhs = q.reshape(_DIGITS * m, groups, g)
    if groups > 1:
        eye = jnp.eye(groups, dtype=jnp.int8)
        lhs = lhs[:, :, None, :] * eye[None, :, :, None]  # [DM, G, G, g]
    lhs = lhs.reshape(_DIGITS * m * groups, k)
    acc = jax.lax.dot_general(lhs, w.codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    acc = acc.reshape(_DIGITS, m, groups, -1).astype(jnp.float32)
    scale = w.scale.astype(jnp.float32).reshape(1, 1, -1 if groups > 1 else 1, acc.shape[-1])
    y = jnp.sum(jnp.sum(acc * scale, axis=2) * s, axis=0)  # [M, N]
    y = y + 0.0 * jnp.sum(x2.astype(jnp.float32), axis=1, keepdims=True)  # NaN / Inf stay visible
    return y.astype(out_dtype)


def _weight_only_xla(x2: jax.Array, w: QArray, out_dtype) -> jax.Array:
    fmt = w.meta.fmt
    cdt = x2.dtype
    if _digits_matmul_ok(x2, w):
        return _digits_matmul(x2, w, out_dtype)
    # Few rows: the weight read dominates, so dequantize it chunk by chunk in cache. Many
    # rows: one full dequantization is amortised, and slicing x into chunks would cost more.
    if jax.default_backend() == "cpu" and x2.dtype == jnp.float32 and fmt.kind != "cast" and x2.shape[0] <= 256:
        rows = _chunk_rows(w)
        if rows is not None:
            return _chunked_dequant_matmul(x2, w, rows, out_dtype)
    if fmt.kind == "cast":
        return jnp.dot(x2, w.values.astype(cdt), preferred_element_type=jnp.float32).astype(out_dtype)
    if fmt.kind == "codebook":
        return jnp.dot(x2, w.dequantize(cdt), preferred_element_type=jnp.float32).astype(out_dtype)
    codes = w.codes.astype(cdt)
    scale, zp = w.scale.astype(jnp.float32), w.zero_point
    t = w.meta.tiling
    m, k = x2.shape
    if t.group_size is None:
        acc = jnp.dot(x2, codes, preferred_element_type=jnp.float32)
        sx = None if zp is None else jnp.sum(x2.astype(jnp.float32), axis=1, keepdims=True)
        return _scaled(acc, sx, scale, w).astype(out_dtype)
    g = t.group_size
    if m > g:  # M partial sums of shape (G, N) would cost more than one dequantized copy
        return jnp.dot(x2, w.dequantize(cdt), preferred_element_type=jnp.float32).astype(out_dtype)
    if cdt == jnp.bfloat16 and jax.default_backend() == "cpu":
        # XLA:CPU has no batched bf16 x bf16 -> f32 dot; the codes are exact in f32 anyway.
        x2, codes = x2.astype(jnp.float32), codes.astype(jnp.float32)
    xg = x2.reshape(m, k // g, g)
    acc = jnp.einsum("mGg,GgN->mGN", xg, codes.reshape(k // g, g, -1), preferred_element_type=jnp.float32)
    sx = None if zp is None else jnp.sum(xg.astype(jnp.float32), axis=2)[..., None]
    return jnp.sum(_scaled(acc, sx, scale, w), axis=1).astype(out_dtype)


def _int32_safe_dot(xq: jax.Array, codes: jax.Array) -> jax.Array:
    """``xq @ codes`` of int8 operands as float32, accumulated in int32 without wrapping.

    Up to ``_INT32_SAFE_K`` contraction rows one int32 dot cannot overflow. Beyond that the
    contraction is cut into chunks of at most that many rows (zero-padded), each summed exactly in
    int32, and the chunks are added in float32.
    """
    m, k = xq.shape
    if k <= _INT32_SAFE_K:
        return jax.lax.dot_general(xq, codes, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.int32).astype(jnp.float32)
    chunks = -(-k // _INT32_SAFE_K)
    c = -(-k // chunks)
    pad = chunks * c - k
    xq = jnp.pad(xq, ((0, 0), (0, pad))).reshape(m, chunks, c)
    codes = jnp.pad(codes, ((0, pad), (0, 0))).reshape(chunks, c, -1)
    acc = jnp.einsum("mCc,CcN->mCN", xq, codes, preferred_element_type=jnp.int32)
    return jnp.sum(acc.astype(jnp.float32), axis=1)


def _w8a8_xla(xq: jax.Array, x_scale: jax.Array, w: QArray, out_dtype) -> jax.Array:
    codes = w.codes
    scale, zp = w.scale.astype(jnp.float32), w.zero_point
    t = w.meta.tiling
    m, k = xq.shape
    if t.group_size is None:
        acc = _int32_safe_dot(xq, codes)
        sx = None if zp is None else jnp.sum(xq.astype(jnp.int32), axis=1, keepdims=True).astype(jnp.float32)
        return (_scaled(acc, sx, scale, w) * x_scale).astype(out_dtype)
    g = t.group_size
    if g > _INT32_SAFE_K:
        raise ValueError(f"W8A8 groups of {g} rows can overflow the int32 accumulator (at most {_INT32_SAFE_K}); "
                         "use smaller groups or per-channel scales")
    xg = xq.reshape(m, k // g, g)
    acc = jnp.einsum("mGg,GgN->mGN", xg, codes.reshape(k // g, g, -1), preferred_element_type=jnp.int32)
    acc = acc.astype(jnp.float32)
    sx = None if zp is None else jnp.sum(xg.astype(jnp.int32), axis=2)[..., None].astype(jnp.float32)
    return (jnp.sum(_scaled(acc, sx, scale, w), axis=1) * x_scale).astype(out_dtype)


# --- dispatch ----------------------------------------------------------------------------
def choose_impl(m: int, k: int, n: int, meta: QMeta, act_spec: QuantSpec | None, impl: str | None) -> str:
    """Which implementation runs: ``"xla"``, ``"interpret"`` or ``"pallas"``.

    ``impl`` forces a choice. Automatic dispatch keeps XLA unless a kernel is known
    to win for this backend and shape (so the quantized op is never slower than XLA).
    """
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
        if impl != "xla" and act_spec is not None and k > _INT32_SAFE_K:
            raise ValueError(f"W8A8 kernels accumulate in int32, which overflows for K = {k} > {_INT32_SAFE_K} "
                             "contraction rows; use impl='xla' (it splits the contraction) or impl=None")
        return impl
    if act_spec is not None and k > _INT32_SAFE_K:
        return "xla"  # the kernels' int32 accumulators could wrap; XLA's path splits the contraction
    try:
        from jaxq.kernels import dispatch as kernel_dispatch  # optional: kernels may be absent
    except ImportError:
        return "xla"
    return kernel_dispatch.auto_impl(m, k, n, meta, act_spec)


def _kernel_matmul(impl, x2, w, act_spec, act_scale, out_dtype):
    from jaxq.kernels import dispatch as kernel_dispatch

    return kernel_dispatch.run(impl, x2, w, act_spec, act_scale, out_dtype)


def _forward(x2, w, act_spec, act_scale, impl, out_dtype):
    if impl != "xla":
        return _kernel_matmul(impl, x2, w, act_spec, act_scale, out_dtype)
    if act_spec is None:
        return _weight_only_xla(x2, w, out_dtype)
    xq, xs = quantize_activation(x2, act_spec, act_scale)
    return _w8a8_xla(xq, xs, w, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _qmatmul_vjp(x2, values, scale, zero_point, meta, act_spec, impl, out_dtype, x_dtype, act_scale=None):
    return _forward(x2, QArray(values, scale, zero_point, meta), act_spec, act_scale, impl, out_dtype)


def _qmatmul_fwd(x2, values, scale, zero_point, meta, act_spec, impl, out_dtype, x_dtype, act_scale=None):
    y = _forward(x2, QArray(values, scale, zero_point, meta), act_spec, act_scale, impl, out_dtype)
    return y, (values, scale, zero_point, act_scale)


def _zero_cotangent(a):
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _qmatmul_bwd(meta, act_spec, impl, out_dtype, x_dtype, res, g):
    values, scale, zero_point, act_scale = res
    w = QArray(values, scale, zero_point, meta).dequantize(jnp.float32)
    dx = jnp.dot(g.astype(jnp.float32), w.T).astype(x_dtype)
    return (dx, _zero_cotangent(values), _zero_cotangent(scale), _zero_cotangent(zero_point),
            _zero_cotangent(act_scale))


_qmatmul_vjp.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def qmatmul(
    x: jax.Array,
    w: QArray,
    *,
    act_spec: QuantSpec | None = None,
    act_scale: jax.Array | None = None,
    impl: str | None = None,
    out_dtype: Any = None,
) -> jax.Array:
    """Computes ``x @ w`` for a quantized weight.

    Args:
      x: activations ``[..., K]`` (f32 or bf16).
      w: a 2-D :class:`QArray` of logical shape ``(K, N)`` with per-channel or
        per-group (along K) scales - what ``jaxq.quantize`` gives a Dense kernel.
      act_spec: an int8 spec (``per_token`` or ``per_tensor``) for W8A8; ``None``
        uses the spec recorded in ``w.meta.act_spec`` by the policy (weight-only
        when that is ``None`` too).
      act_scale: a static (calibrated) activation scale; ``None`` computes it per call.
      impl: ``"xla"``, ``"interpret"`` (Pallas kernel in interpret mode),
        ``"pallas"`` (compiled kernel), or ``None`` to choose automatically.
      out_dtype: output dtype (default: ``x.dtype``).

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    *lead, k = x.shape
    _check_weight(w, k)
    act_spec = act_spec if act_spec is not None else w.meta.act_spec
    if act_spec is not None:
        check_activation_spec(act_spec)
        if w.meta.fmt.kind != "int":
            raise ValueError(f"W8A8 needs integer weights, got {w.format}; use weight-only (act_spec=None)")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x2 = x.reshape(-1, k)
    if act_scale is not None:
        act_scale = jnp.asarray(act_scale, jnp.float32).reshape(1, 1)
    chosen = choose_impl(x2.shape[0], k, w.shape[1], w.meta, act_spec, impl)
    y = _qmatmul_vjp(
        x2, w.values, w.scale, w.zero_point, w.meta, act_spec, chosen, jnp.dtype(out_dtype), x2.dtype, act_scale
    )
    return y.reshape(*lead, w.shape[1])
