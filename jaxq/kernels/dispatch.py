"""Glue between :func:`jaxq.ops.qmatmul` and the kernels: QArray -> raw arrays, and auto-dispatch.

``jaxq.ops.qmatmul`` calls two functions here:

* :func:`auto_impl` - which implementation runs when the caller did not force one.
  XLA unless (a) the backend is a GPU or TPU, (b) the kernel supports this weight
  layout and shape, and (c) :data:`jaxq.kernels.block_tables.KERNEL_WINS` records a
  measured win on this device for this kernel kind and M. That makes "the
  quantized op is never slower than XLA" a property of the table, which only
  measurements fill.
* :func:`run` - executes a kernel (``impl="pallas"`` compiled, ``"interpret"``
  in Pallas interpret mode) for a 2-D activation and a QArray weight.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxq.kernels.block_tables import has_int8_units, kernel_wins
from jaxq.kernels.common import default_target, is_pow2
from jaxq.kernels.w8a8 import w8a8_matmul, w8a8_matmul_dynamic
from jaxq.kernels.weight_only import weight_only_matmul
from jaxq.numerics import codec, ranges
from jaxq.qarray import QArray, QMeta
from jaxq.spec import QuantSpec


def unsupported_reason(meta: QMeta, act_spec: QuantSpec | None, k: int, n: int) -> str | None:
    """Why the kernels cannot run this weight (None when they can, at least in interpret mode)."""
    fmt = meta.fmt
    if fmt.kind != "int":
        return f"format {fmt.name!r} has no integer-code kernel"
    t = meta.tiling
    # Channel axes below -2 belong to leading (layer) axes that scan/vmap stripped off.
    chans = tuple(a for a in t.channel_axes if a >= -2)
    if chans not in ((), (-1,)) or t.group_axis not in (None, -2):
        return f"scales must be per output channel or per group along K, got {t}"
    if meta.pack_axis is not None and fmt.pack_codes != 2:
        return f"{fmt.name} codes are packed {fmt.pack_codes} per {fmt.pack_bytes} byte(s); the kernels take int8 or int4"
    if meta.zero_point_domain != "code":
        return "the kernels take code-domain zero points; value-domain ones (GGUF Q4_1) run on XLA"
    if meta.pack_axis not in (None, -2):
        return f"int4 codes must be packed along K (pack_axis=-2), got pack_axis={meta.pack_axis}"
    if act_spec is not None:
        if act_spec.fmt.name != "int8" or not act_spec.symmetric:
            return "W8A8 kernels take symmetric int8 activations"
        if not meta.symmetric and meta.pack_axis is None:
            return "W8A8 kernels take zero points only for int4 weights"
    return None


def _gpu_compilable(meta: QMeta, act_spec: QuantSpec | None) -> bool:
    """Triton: per-group dots must be power-of-two deep and >= 16 (>= 32 for int8 operands)."""
    g = meta.tiling.group_size
    if g is None:
        return True
    depth = g // (2 if meta.pack_axis is not None else 1)
    return is_pow2(depth) and depth >= (32 if act_spec is not None else 16)


def _tpu_lane_aligned(meta: QMeta) -> bool:
    """Mosaic: each group's x slice is a lane slice; narrower than 128 lanes means relayouts."""
    g = meta.tiling.group_size
    return g is None or (g // (2 if meta.pack_axis is not None else 1)) % 128 == 0


def _kind(meta: QMeta, act_spec: QuantSpec | None) -> str:
    if act_spec is not None:
        return "w8a8"
    return "w4a16" if meta.pack_axis is not None else "w8a16"


def auto_impl(m: int, k: int, n: int, meta: QMeta, act_spec: QuantSpec | None) -> str:
    """``"pallas"`` where a measured table entry says the kernel wins, else ``"xla"``."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm", "tpu"):
        return "xla"  # interpret mode is for testing, never faster
    if unsupported_reason(meta, act_spec, k, n) is not None:
        return "xla"
    if act_spec is not None and not has_int8_units():
        return "xla"  # an int8 kernel would be emulated; XLA picks the chip's best path
    if backend != "tpu" and not _gpu_compilable(meta, act_spec):
        return "xla"
    if backend == "tpu" and not _tpu_lane_aligned(meta):
        return "xla"
    if k % 128 or n % 128:  # would pad (copy) the weights on every call
        return "xla"
    grouped = meta.tiling.group_size is not None
    return "pallas" if kernel_wins(_kind(meta, act_spec), m, k, n, grouped) else "xla"


def _full_scale(a: jax.Array | None, n: int) -> jax.Array | None:
    """Stored (G, 1) or (G, N) scales / zero points -> (G, N) float32 (per-tensor weights broadcast)."""
    if a is None:
        return None
    a = jnp.asarray(a, jnp.float32)
    return jnp.broadcast_to(a, (a.shape[0], n))


def _activation_scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Dynamic activation scale, per row (per_token) or one for all - the same numerics as jaxq.ops."""
    axes = (1,) if spec.granularity == "per_token" else (0, 1)
    lo, hi = ranges.select_range(jax.lax.stop_gradient(x), axes, spec.range_method, spec.fmt, True, spec.percentile)
    scale, _ = codec.scale_and_zero_point(lo, hi, spec.fmt, True)
    return scale


def run(
    impl: str,
    x2: jax.Array,
    w: QArray,
    act_spec: QuantSpec | None,
    act_scale: jax.Array | None,
    out_dtype: Any,
) -> jax.Array:
    """``x2 @ w`` with a kernel (``impl`` is ``"pallas"`` or ``"interpret"``).

    Raises:
      NotImplementedError: the kernels do not cover this weight; the message says why
        (``impl=None`` would have chosen XLA).
    """
    if impl not in ("pallas", "interpret"):
        raise ValueError(f"kernel dispatch got impl={impl!r}; expected 'pallas' or 'interpret'")
    k, n = w.shape
    reason = unsupported_reason(w.meta, act_spec, k, n)
    if reason is not None:
        raise NotImplementedError(f"no Pallas kernel for this weight: {reason}; use impl='xla' or impl=None")
    interpret = impl == "interpret"
    target = default_target()
    packed = w.meta.pack_axis is not None
    scale = _full_scale(w.scale, n)
    zp = _full_scale(w.zero_point, n)
    common = dict(packed=packed, out_dtype=jnp.dtype(out_dtype), target=target, interpret=interpret)
    if act_spec is None:
        return weight_only_matmul(x2, w.values, scale, zp, **common)
    fused = act_scale is None and act_spec.granularity == "per_token" and act_spec.range_method == "absmax"
    if fused:
        return w8a8_matmul_dynamic(x2, w.values, scale, zp, **common)
    xs = _activation_scale(x2, act_spec) if act_scale is None else jnp.asarray(act_scale, jnp.float32)
    xq = codec.encode(x2, xs, None, act_spec.fmt, True)
    return w8a8_matmul(xq, w.values, xs.reshape(-1, 1), scale, zp, **common)
