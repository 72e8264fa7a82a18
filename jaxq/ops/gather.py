"""Row lookups (embeddings) from float arrays or QArrays.

An embedding lookup is a gather, not a contraction, so it cannot go through the matmul ops. For a
QArray it gathers the stored codes and their scales along the lookup axis and dequantizes only
the rows it picked, so a quantized embedding (or a tied output head read as an embedding) is
never dequantized whole.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxq.qarray import QArray


def _take_scale(a: Any, ids: jax.Array, axis: int) -> Any:
    if a is None:
        return None
    if a.shape[axis] == 1:  # shared along the lookup axis: broadcast to the gathered length
        shape = list(a.shape)
        shape[axis] = ids.size
        return jnp.broadcast_to(a, shape)
    return jnp.take(a, ids.reshape(-1), axis=axis)


def take(table: Any, ids: jax.Array, axis: int = 0, dtype: Any = None) -> jax.Array:
    """``jnp.take(table, ids, axis)`` for a float array or a :class:`jaxq.QArray`.

    Args:
      table: ``[..., N, ...]`` lookup table (e.g. an embedding ``[V, D]``, ``axis=0``, or a tied
        head kernel ``[D, V]``, ``axis=1``).
      ids: integer indices of any shape.
      axis: the axis indexed by ``ids``.
      dtype: result dtype (default: the table's logical dtype).

    Returns:
      The picked slices, with ``ids``' shape in place of ``axis`` (as ``jnp.take``).
    """
    ids = jnp.asarray(ids)
    if not isinstance(table, QArray):
        out = jnp.take(table, ids, axis=axis)
        return out if dtype is None else out.astype(dtype)
    ndim = table.ndim
    axis = axis % ndim
    neg = axis - ndim
    meta = table.meta
    if neg == meta.pack_axis or neg == meta.tiling.group_axis or meta.fmt.kind == "cast":
        # Codes packed or grouped along the lookup axis: no row-wise view; dequantize first.
        return jnp.take(table.dequantize(dtype), ids, axis=axis)
    flat = ids.reshape(-1)
    picked = QArray(
        jnp.take(table.values, flat, axis=axis),
        _take_scale(table.scale, flat, axis),
        _take_scale(table.zero_point, flat, axis),
        meta,
    )
    out = picked.dequantize(dtype)
    return out.reshape(out.shape[:axis] + ids.shape + out.shape[axis + 1 :])
