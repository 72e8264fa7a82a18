"""Encoding real numbers into a format's codes and back, given a range.

Everything here works on the *grouped form* of a tensor (see :mod:`tiling`):
``lo`` and ``hi`` are keep-dims statistics that broadcast against ``xg``.
One encode/decode pair serves every format, so range selection, the MSE clip
search, fake quantization and the stored QArray all share the same numerics.

Zero points of asymmetric int grids live in one of two domains (``zero_point_domain``):

* ``"code"`` (the default): an integer-valued float on the code grid, ``x = (c - zp) * s``;
* ``"value"``: the real value of the lowest code, ``x = (c - qmin) * s + zp`` (GGUF's Q4_1
  ``d * q + m`` with ``q = c - qmin``), which a code-domain zero point cannot reproduce bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.numerics.formats import NF4_CODEBOOK, Format

_TINY = 1e-30  # scales below this are treated as "all zero" and replaced by 1


def _safe(scale: jax.Array) -> jax.Array:
    # An all-zero group gives scale 0; any positive scale then encodes it exactly as 0.
    return jnp.where(scale > _TINY, scale, jnp.ones_like(scale))


def scale_and_zero_point(
    lo: jax.Array, hi: jax.Array, fmt: Format, symmetric: bool, full_range: bool = False,
    zero_point_domain: str = "code",
) -> tuple[jax.Array, jax.Array | None]:
    """Chooses scale (and zero point) so that ``[lo, hi]`` maps onto the code range.

    Symmetric formats use ``max(|lo|, |hi|)``, mapped onto ``fmt.symmetric_bound(full_range)``;
    asymmetric ones widen ``[lo, hi]`` to contain 0 so that zero stays exactly representable
    (padding, ReLU outputs). The zero point is an integer-valued float in the code domain.
    In the ``"value"`` domain the range is used as it is: ``scale = (hi - lo) / (qmax - qmin)``
    and the zero point is ``lo`` itself (the value of code ``qmin``).
    """
    lo = lo.astype(jnp.float32)
    hi = hi.astype(jnp.float32)
    if fmt.kind == "int":
        qmin, qmax = fmt.int_range(symmetric)
        if symmetric:
            bound = fmt.symmetric_bound(full_range)
            return _safe(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / bound), None
        if zero_point_domain == "value":
            return _safe((hi - lo) / (qmax - qmin)), lo
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        scale = _safe((hi - lo) / (qmax - qmin))
        zp = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
        return scale, zp
    if fmt.kind in ("float", "codebook"):
        return _safe(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / fmt.max_value), None
    raise ValueError(f"format {fmt.name!r} has no scale")


def encode(
    xg: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    fmt: Format,
    symmetric: bool,
    full_range: bool = False,
    zero_point_domain: str = "code",
) -> jax.Array:
    """Real values -> codes in ``fmt.storage_dtype`` (unpacked: one code per element)."""
    if fmt.kind == "int" and zero_point is not None and zero_point_domain == "value":
        qmin, qmax = fmt.int_range(False)
        y = (xg.astype(jnp.float32) - zero_point) / scale + qmin
        return jnp.clip(jnp.round(y), qmin, qmax).astype(jnp.int8)
    y = xg.astype(jnp.float32) / scale
    if fmt.kind == "int":
        qmin, qmax = fmt.int_range(symmetric, full_range)
        if zero_point is not None:
            y = y + zero_point
        return jnp.clip(jnp.round(y), qmin, qmax).astype(jnp.int8)
    if fmt.kind == "float":
        return jnp.clip(y, -fmt.max_value, fmt.max_value).astype(fmt.storage_dtype)
    if fmt.kind == "codebook":
        book = jnp.asarray(NF4_CODEBOOK)
        mids = (book[1:] + book[:-1]) / 2
        idx = jnp.searchsorted(mids, jnp.clip(y, -1.0, 1.0), method="compare_all")
        return (idx - 8).astype(jnp.int8)
    raise ValueError(f"format {fmt.name!r} is not encoded with a scale")


def decode(
    q: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    fmt: Format,
    dtype: jnp.dtype = jnp.float32,
    zero_point_domain: str = "code",
) -> jax.Array:
    """Codes -> real values in ``dtype`` (``scale`` must broadcast against ``q``).

    ``(q - zero_point) * scale``; in the ``"value"`` domain ``(q - qmin) * scale + zero_point``.
    """
    if zero_point is not None and zero_point_domain == "value":
        qmin = fmt.int_range(False)[0]
        v = (q.astype(jnp.float32) - qmin) * scale + zero_point.astype(jnp.float32)
        return v.astype(dtype)
    if fmt.kind == "codebook":
        v = jnp.asarray(NF4_CODEBOOK)[q.astype(jnp.int32) + 8]
    else:
        v = q.astype(jnp.float32)
        if zero_point is not None:
            v = v - zero_point
    return (v * scale).astype(dtype)


def fake_quantize(
    xg: jax.Array, lo: jax.Array, hi: jax.Array, fmt: Format, symmetric: bool, full_range: bool = False
) -> jax.Array:
    """``decode(encode(x))`` for the range ``[lo, hi]``, in float32."""
    scale, zp = scale_and_zero_point(lo, hi, fmt, symmetric, full_range)
    return decode(encode(xg, scale, zp, fmt, symmetric, full_range), scale, zp, fmt)
