"""Packing of 4-bit codes two per byte.

Layout (the contract that kernels rely on): along the packing axis, element
``2i`` goes into the low nibble and element ``2i + 1`` into the high nibble of
byte ``i``; each nibble is a two's-complement signed 4-bit integer in
``[-8, 7]``, and the byte is stored as ``int8``. Unpacking uses only shifts, so
it works in every backend, Pallas interpret mode included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
    """Packs int8 codes in ``[-8, 7]`` two per byte along ``axis`` (length must be even)."""
    axis = axis % q.ndim
    n = q.shape[axis]
    if n % 2:
        raise ValueError(f"cannot pack an odd length {n} along axis {axis} of shape {q.shape}")
    q = q.astype(jnp.int8)
    even = jax.lax.slice_in_dim(q, 0, n, 2, axis)
    odd = jax.lax.slice_in_dim(q, 1, n, 2, axis)
    lo = jnp.bitwise_and(even.astype(jnp.uint8), jnp.uint8(0x0F))
    hi = jnp.left_shift(odd.astype(jnp.uint8), jnp.uint8(4))
    return jax.lax.bitcast_convert_type(jnp.bitwise_or(lo, hi), jnp.int8)


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`pack_int4`: returns int8 codes, twice as long along ``axis``."""
    axis = axis % packed.ndim
    lo = jnp.right_shift(jnp.left_shift(packed, jnp.int8(4)), jnp.int8(4))  # sign-extends
    hi = jnp.right_shift(packed, jnp.int8(4))
    both = jnp.stack([lo, hi], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape)
