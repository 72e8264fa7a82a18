"""`QArray`: a quantized tensor as a pytree (stored codes + scale [+ zero point]).

The array children (``values``, ``scale``, ``zero_point``) are pytree leaves, so a
QArray flows through ``jit``, ``vmap``, ``scan``, ``tree_map``, ``device_put`` and
sharding like any array. Everything else is static metadata (:class:`QMeta`),
stored with negative axes so that mapping over leading axes keeps it valid. The
logical shape is derived from ``values`` (not stored), for the same reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.numerics import codec, ranges
from jaxq.numerics.formats import Format, get_format
from jaxq.numerics.packing import pack_codes, unpack_codes
from jaxq.numerics.tiling import Tiling
from jaxq.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class QMeta:
    """Static description of a QArray.

    Attributes:
      format: canonical format name.
      dtype: logical (dequantized) dtype.
      tiling: how ``scale`` tiles the tensor.
      symmetric: whether there is no zero point.
      pack_axis: negative axis along which sub-byte codes share a byte, or None
        (two per byte for int4/nf4, four for int2, eight per three bytes for int3:
        ``fmt.pack_codes`` per ``fmt.pack_bytes``).
      act_spec: how the activations that meet this weight in a matmul are
        quantized (W8A8), as chosen by the policy rule; ``None`` for weight-only.
        The ops read it, so a quantized tree carries its own serving recipe.
      zero_point_domain: ``"code"`` (``x = (c - zp) * s``, ``zp`` an integer on the code grid)
        or ``"value"`` (``x = (c - qmin) * s + zp``, ``zp`` the real value of the lowest code,
        as GGUF's Q4_1 stores it). The XLA matmuls of :mod:`jaxq.ops` handle both; the Pallas
        kernels take code-domain zero points only, so value-domain weights run on XLA.
    """

    format: str
    dtype: np.dtype
    tiling: Tiling
    symmetric: bool = True
    pack_axis: int | None = None
    act_spec: QuantSpec | None = None
    zero_point_domain: str = "code"

    @property
    def fmt(self) -> Format:
        return get_format(self.format)


def _nbytes(a: Any) -> int:
    if a is None:
        return 0
    return int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize


@jax.tree_util.register_pytree_node_class
class QArray:
    """A quantized tensor.

    ``dequantize(q) == (codes - zero_point) * scale`` with ``scale`` broadcast by
    the tiling (codes looked up in the codebook for nf4; a plain cast for bf16/fp16), or
    ``(codes - qmin) * scale + zero_point`` for a value-domain zero point (``meta.zero_point_domain``).
    """

    __slots__ = ("values", "scale", "zero_point", "meta")

    def __init__(self, values: Any, scale: Any, zero_point: Any, meta: QMeta):
        # No validation here: JAX rebuilds pytrees with placeholder leaves.
        self.values = values
        self.scale = scale
        self.zero_point = zero_point
        self.meta = meta

    # --- pytree protocol ---------------------------------------------------------------
    def tree_flatten(self):
        return (self.values, self.scale, self.zero_point), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(*children, meta)

    # --- logical view ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.values.shape)
        if self.meta.pack_axis is not None:
            fmt = self.meta.fmt
            shape[self.meta.pack_axis] = shape[self.meta.pack_axis] * fmt.pack_codes // fmt.pack_bytes
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def dtype(self) -> np.dtype:
        return self.meta.dtype

    @property
    def format(self) -> str:
        return self.meta.format

    @property
    def nbytes(self) -> int:
        """Real storage bytes: codes (packed or in their container) plus scales and zero points."""
        return _nbytes(self.values) + _nbytes(self.scale) + _nbytes(self.zero_point)

    @property
    def codes(self) -> jax.Array:
        """Unpacked integer codes (int8), one per logical element (int and codebook formats)."""
        if self.meta.pack_axis is None:
            return self.values
        return unpack_codes(self.values, self.meta.pack_axis, self.meta.fmt.pack_codes)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The real-valued tensor, in ``dtype`` (default: the logical dtype)."""
        dtype = self.meta.dtype if dtype is None else dtype
        fmt = self.meta.fmt
        if fmt.kind == "cast":
            return self.values.astype(dtype)
        tiling = self.meta.tiling
        codes = self.codes
        scale = tiling.scale_to_grouped(self.scale.astype(jnp.float32))
        zp = None if self.zero_point is None else tiling.scale_to_grouped(self.zero_point)
        x = codec.decode(tiling.to_grouped(codes), scale, zp, fmt, jnp.float32, self.meta.zero_point_domain)
        return x.reshape(self.shape).astype(dtype)

    def code_zero_point(self) -> jax.Array | None:
        """The zero point on the code grid (stored shape, float32), or None when there is none.

        ``(codes - code_zero_point()) * scale`` equals :meth:`dequantize` up to float rounding,
        so matmul formulas written for code-domain zero points serve value-domain ones too. For a
        value-domain zero point it is ``qmin - zero_point / scale`` (a zero scale, which encodes
        a constant group, gives 0 there; use :meth:`dequantize` where that matters).
        """
        if self.zero_point is None:
            return None
        if self.meta.zero_point_domain != "value":
            return self.zero_point
        qmin = self.meta.fmt.int_range(False)[0]
        s = self.scale.astype(jnp.float32)
        safe = jnp.where(s == 0, jnp.ones_like(s), s)
        return jnp.where(s == 0, 0.0, qmin - self.zero_point.astype(jnp.float32) / safe)

    def __repr__(self) -> str:
        t = self.meta.tiling
        gran = f"group={t.group_size}@{t.group_axis}" if t.group_size else f"channels={t.channel_axes}"
        zp = ", zero_point" if self.zero_point is not None else ""
        if zp and self.meta.zero_point_domain != "code":
            zp += f"({self.meta.zero_point_domain})"
        return (
            f"QArray({self.meta.format}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"{gran}{zp}, nbytes={self.nbytes})"
        )


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _choose_pack_axis(shape: Sequence[int], tiling: Tiling, factor: int) -> int | None:
    """Packs along the contraction axis: the group axis, else -2, else any axis that divides."""
    ndim = len(shape)
    candidates = []
    if tiling.group_axis is not None:
        candidates.append(tiling.group_axis)
    if ndim >= 2:
        candidates.append(-2)
    candidates += [a - ndim for a in range(ndim - 1, -1, -1)]
    for a in candidates:
        if shape[a] % factor == 0:
            return a
    return None  # no axis divides: keep one code per byte (nbytes says so)


def quantize_array(
    x: jax.Array,
    spec: QuantSpec,
    *,
    where: str = "",
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    act_spec: QuantSpec | None = None,
) -> "QArray | jax.Array":
    """Quantizes one tensor according to ``spec``.

    Args:
      x: a floating-point array (or tracer).
      spec: the quantization spec.
      where: a name for error messages (the parameter path).
      scale: optional precomputed scale in the stored scale shape (e.g. a scale
        learned by quantization-aware training); the range method is then skipped.
      zero_point: optional precomputed zero point (asymmetric formats).
      act_spec: activation spec recorded in the metadata for W8A8 serving.

    Returns:
      A :class:`QArray`, or ``x`` itself for the fp32 (untouched) format.
    """
    fmt = spec.fmt
    if fmt.kind == "none":
        return x
    logical_dtype = np.dtype(x.dtype)
    if fmt.kind == "cast":
        meta = QMeta(fmt.name, logical_dtype, Tiling(), act_spec=act_spec)
        return QArray(x.astype(fmt.storage_dtype), None, None, meta)
    tiling = spec.tiling(x.shape, where)
    xg = tiling.to_grouped(x)
    if scale is None:
        axes = tiling.reduce_axes(x.ndim)
        lo, hi = ranges.select_range(xg, axes, spec.range_method, fmt, spec.symmetric, spec.percentile, spec.full_range)
        scale_g, zp_g = codec.scale_and_zero_point(lo, hi, fmt, spec.symmetric, spec.full_range,
                                                   spec.zero_point_domain)
    else:
        expected = tiling.scale_shape(x.shape)
        if tuple(scale.shape) != expected:
            raise ValueError(
                f"scale for {where or 'tensor'} of shape {tuple(x.shape)} has shape "
                f"{tuple(scale.shape)}; {spec.granularity} {fmt.name} needs {expected}"
            )
        scale_g = tiling.scale_to_grouped(jnp.abs(scale.astype(jnp.float32)))
        zp_g = None if zero_point is None else tiling.scale_to_grouped(zero_point.astype(jnp.float32))
        if zp_g is None and not spec.symmetric:
            raise ValueError(f"asymmetric spec for {where or 'tensor'} needs a zero_point with its scale")
    codes = codec.encode(xg, scale_g, zp_g, fmt, spec.symmetric, spec.full_range,
                         spec.zero_point_domain).reshape(x.shape)
    pack_axis = _choose_pack_axis(x.shape, tiling, fmt.pack_codes) if fmt.packed else None
    values = codes if pack_axis is None else pack_codes(codes, pack_axis, fmt.pack_codes)
    stored_scale = tiling.scale_from_grouped(scale_g).astype(spec.scale_dtype)
    stored_zp = None if zp_g is None else tiling.scale_from_grouped(zp_g).astype(spec.scale_dtype)
    domain = spec.zero_point_domain if stored_zp is not None else "code"
    meta = QMeta(fmt.name, logical_dtype, tiling, spec.symmetric, pack_axis, act_spec, domain)
    return QArray(values, stored_scale, stored_zp, meta)
