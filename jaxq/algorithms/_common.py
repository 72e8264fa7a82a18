"""Helpers shared by the calibration algorithms: validation, weight layouts, fake quantization.

Every algorithm here works on a Flax ``Dense`` kernel ``W [K, N]`` (``y = x @ W``: ``K`` input
channels, ``N`` output channels). A :class:`~jaxq.spec.QuantSpec` tiles such a kernel in one of
three ways that the algorithms understand, all viewed as ``[G, g, N]`` (``G`` groups of ``g``
consecutive input rows):

* ``per_channel`` (one scale per output column): ``G = 1, g = K``, scales ``[1, N]``;
* ``per_group`` along the input axis: ``G = K / group_size``, scales ``[G, N]``;
* ``per_tensor``: ``G = 1``, one scale ``[1, 1]``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.algorithms.grid import Grid
from jaxq.numerics import codec, ranges
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec, as_spec


def check_channels(name: str, shape: Sequence[int], k: int, what: str = "calibration activations") -> None:
    """Raises ``ValueError`` unless the last axis of ``shape`` has ``k`` channels."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or shape[-1] != k:
        raise ValueError(
            f"{what} for {name or 'layer'} have shape {shape}; expected (..., K={k}) "
            f"to match the weight's input dimension K={k}"
        )


def check_weight(name: str, w: Any, ndim: int = 2) -> None:
    """Raises ``ValueError`` unless ``w`` is a float array of rank ``ndim``."""
    if getattr(w, "ndim", None) != ndim:
        raise ValueError(
            f"weight for {name or 'layer'} has shape {tuple(getattr(w, 'shape', ()))}; expected a rank-{ndim} "
            "Dense kernel [K, N] (y = x @ W)"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"weight for {name or 'layer'} must be floating point, got {w.dtype}")


def check_kernels(w: Any, method: str, name: str) -> tuple[list[Any], bool, int]:
    """Validates one kernel ``[K, N]`` or a sequence of kernels sharing the input dimension.

    Returns ``(kernels, many, K)``; ``many`` says whether a sequence was passed.
    """
    many = not hasattr(w, "ndim")
    ws = list(w) if many else [w]
    if not ws:
        raise ValueError(f"{method} needs at least one kernel")
    for i, wi in enumerate(ws):
        check_weight(f"{name}[{i}]" if many else name, wi)
    k = int(ws[0].shape[0])
    if any(int(wi.shape[0]) != k for wi in ws):
        raise ValueError(
            f"kernels passed together to {method} for {name or 'layer'} must share the input dimension; "
            f"got shapes {[tuple(x.shape) for x in ws]}"
        )
    return ws, many, k


def concat_kernels(ws: Sequence[Any]) -> tuple[Any, list[tuple[int, int, Any]]]:
    """Kernels side by side as one ``[K, sum N_i]`` float32 matrix, and the column splits
    ``(start, size, dtype)`` that :func:`split_to_qarrays` takes to cut the result apart."""
    splits, start = [], 0
    for wi in ws:
        splits.append((start, int(wi.shape[1]), np.dtype(wi.dtype)))
        start += int(wi.shape[1])
    cat = jnp.concatenate([wi.astype(jnp.float32) for wi in ws], axis=1) if len(ws) > 1 else ws[0]
    return cat, splits


class Layout(NamedTuple):
    """How a spec tiles a ``[K, N]`` kernel: ``G`` groups of ``g`` rows; scale stored as ``[G|1, N|1]``."""

    groups: int
    group_size: int
    per_tensor: bool


def weight_layout(spec: QuantSpec, shape: Sequence[int], name: str = "") -> Layout:
    """Validates that ``spec`` tiles a 2-D kernel in a way the algorithms support."""
    spec = as_spec(spec)
    k, n = shape
    tiling = spec.tiling(shape, where=name)  # validates group size etc.
    if tiling.group_axis is not None:
        if tiling.group_axis != -2 or tiling.channel_axes not in ((-1,), ()):
            raise ValueError(
                f"{name or 'layer'}: per-group scales must group the input axis (group_axis=-2) of the "
                f"[K, N] kernel with per-output-channel scales; got {tiling}"
            )
        if tiling.channel_axes == ():
            raise ValueError(f"{name or 'layer'}: per-group scales need the output channel axis -1")
        return Layout(k // tiling.group_size, tiling.group_size, False)
    if tiling.channel_axes == (-1,):
        return Layout(1, k, False)
    if tiling.channel_axes == ():
        return Layout(1, k, True)
    raise ValueError(
        f"{name or 'layer'}: unsupported scale tiling {tiling} for a [K, N] kernel; use per_tensor, "
        "per_channel over the output axis (-1) or per_group over the input axis (-2)"
    )


def stored_scale(scale_g: jax.Array) -> jax.Array:
    """Scale or zero point in ``[G, 1, N]`` (or ``[1, 1, 1]``) form -> stored shape ``[G, N]``/``[1, 1]``."""
    return scale_g[:, 0, :]


def group_range(
    wg: jax.Array, grid: Grid, per_tensor: bool, ratio: jax.Array | float = 1.0
) -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero point for ``wg [G, g, N]`` by ``grid.range_method``, clip-scaled by ``ratio``.

    Returns keep-dims ``[G, 1, N]`` (``[1, 1, 1]`` per tensor) arrays.
    """
    axes = (0, 1, 2) if per_tensor else (1,)
    lo, hi = ranges.select_range(wg, axes, grid.range_method, grid.fmt, grid.symmetric, grid.percentile, grid.full_range)
    return grid_scale(lo * ratio, hi * ratio, grid)


def grid_scale(lo: jax.Array, hi: jax.Array, grid: Grid) -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero point that map the range ``[lo, hi]`` onto ``grid``'s codes."""
    return codec.scale_and_zero_point(lo, hi, grid.fmt, grid.symmetric, grid.full_range)


def base_range(wg: jax.Array, grid: Grid, per_tensor: bool) -> tuple[jax.Array, jax.Array]:
    """Full (unclipped) range ``[lo, hi]`` of each group: absmax if symmetric, else min/max."""
    axes = (0, 1, 2) if per_tensor else (1,)
    if grid.symmetric:
        return ranges.absmax(wg, axes)
    return ranges.minmax(wg, axes)


def fake_quant_grouped(
    wg: jax.Array, scale: jax.Array, zp: jax.Array | None, grid: Grid
) -> jax.Array:
    """``decode(encode(wg))`` with broadcastable ``scale``/``zp`` (float32)."""
    fmt = grid.fmt
    return codec.decode(codec.encode(wg, scale, zp, fmt, grid.symmetric, grid.full_range), scale, zp, fmt)


def rtn_fake_quant(w: jax.Array, grid: Grid, layout: Layout) -> jax.Array:
    """Round-to-nearest fake quantization of a ``[K, N]`` kernel tiled by ``layout`` (float32)."""
    wg = w.astype(jnp.float32).reshape(layout.groups, layout.group_size, -1)
    scale, zp = group_range(wg, grid, layout.per_tensor)
    return fake_quant_grouped(wg, scale, zp, grid).reshape(w.shape)


def to_qarray(w_q: jax.Array, scale_g: jax.Array, zp_g: jax.Array | None, spec: QuantSpec, dtype: Any, name: str = ""):
    """Packs a kernel that already lies on the grid of ``scale_g``/``zp_g`` into a QArray.

    ``w_q`` holds dequantized values (exact grid points), so re-encoding with the same scale
    reproduces the codes the algorithm chose.
    """
    from jaxq.qarray import quantize_array

    scale = stored_scale(scale_g)
    zp = None if zp_g is None else stored_scale(zp_g)
    # Encode from float32: a bf16 copy of the grid points could round onto a neighbouring code.
    q = quantize_array(w_q.astype(jnp.float32), spec, where=name, scale=scale, zero_point=zp)
    return QArray(q.values, q.scale, q.zero_point, dataclasses.replace(q.meta, dtype=np.dtype(dtype)))


def tie_reduce(v: jax.Array, tie: jax.Array | None, slots: int, how: str) -> jax.Array:
    """Per-channel statistic ``v [K]`` reduced onto ``slots`` tied scale slots (``tie[k]`` = slot of
    channel ``k``) by ``"mean"`` or ``"max"``; identity when ``tie`` is None."""
    if tie is None:
        return v
    if how == "max":
        return jax.ops.segment_max(v, tie, num_segments=slots)
    total = jax.ops.segment_sum(v, tie, num_segments=slots)
    return total / jnp.maximum(jax.ops.segment_sum(jnp.ones_like(v), tie, num_segments=slots), 1.0)


def check_tie(name: str, tie: Any, k: int) -> tuple[jax.Array | None, int]:
    """Validates a tie map (``[K]`` ints) and returns it with its number of slots."""
    if tie is None:
        return None, k
    t = np.asarray(tie)
    if t.shape != (k,) or not np.issubdtype(t.dtype, np.integer) or t.min() < 0:
        raise ValueError(f"tie map for {name or 'layer'} must be {k} non-negative slot indices, got shape {t.shape}")
    return jnp.asarray(t, jnp.int32), int(t.max()) + 1


@partial(jax.jit, static_argnames=("start", "size", "spec", "dtype"))
def _pack(w_q, scale_g, zp_g, *, start: int, size: int, spec: QuantSpec, dtype: Any) -> QArray:
    cols = lambda a: a if a.shape[-1] == 1 else a[..., start : start + size]  # noqa: E731  (per-tensor: shared)
    return to_qarray(w_q[:, start : start + size], cols(scale_g), None if zp_g is None else cols(zp_g), spec, dtype)


def split_to_qarrays(
    w_q: jax.Array,
    scale_g: jax.Array,
    zp_g: jax.Array | None,
    spec: QuantSpec,
    splits: Sequence[tuple[int, int, Any]],
) -> tuple[QArray, ...]:
    """One QArray per ``(start, size, dtype)`` column range of a jointly quantized ``[K, N]`` kernel.

    Kept outside the algorithms' jitted cores so that kernels of different widths sharing one
    concatenated shape reuse the compiled core (only this small packing step is per width).
    """
    return tuple(_pack(w_q, scale_g, zp_g, start=a, size=n, spec=spec, dtype=np.dtype(dt)) for a, n, dt in splits)


def quadratic_error(d: jax.Array, h: jax.Array) -> jax.Array:
    """``tr(D^T H D) = sum_n d_n^T H d_n``: the summed squared output error ``||X D||^2`` when ``H = X^T X``."""
    d = d.astype(jnp.float32)
    return jnp.sum(d * jnp.dot(h, d, precision=jax.lax.Precision.HIGHEST))


def block_diag(h: jax.Array, groups: int, g: int) -> jax.Array:
    """The ``G`` diagonal ``[g, g]`` blocks of ``H [G*g, G*g]`` as ``[G, g, g]``."""
    h4 = h.reshape(groups, g, groups, g)
    idx = jnp.arange(groups)
    return h4[idx, :, idx, :]
