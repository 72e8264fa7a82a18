"""Packing of sub-byte codes: 4-bit two per byte, 2-bit four per byte, 3-bit eight per three bytes.

Layout (the contract that kernels rely on): along the packing axis, element
``2i`` goes into the low nibble and element ``2i + 1`` into the high nibble of
byte ``i``; each nibble is a two's-complement signed 4-bit integer in
``[-8, 7]``, and the byte is stored as ``int8``. 2-bit codes follow the same
rule: element ``4i + j`` sits in bits ``2j..2j+1`` of byte ``i`` as a signed
2-bit integer in ``[-2, 1]``. 3-bit codes go eight to a 24-bit little-endian word:
element ``8i + j`` sits in bits ``3j..3j+2`` of the word stored in bytes ``3i..3i+2``, as a
signed 3-bit integer in ``[-4, 3]``. Unpacking uses only shifts and masks, so it works in every
backend, Pallas interpret mode included.
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


def pack_int2(q: jax.Array, axis: int) -> jax.Array:
    """Packs int8 codes in ``[-2, 1]`` four per byte along ``axis`` (length divisible by 4)."""
    axis = axis % q.ndim
    n = q.shape[axis]
    if n % 4:
        raise ValueError(f"cannot pack length {n} four per byte along axis {axis} of shape {q.shape}")
    u = q.astype(jnp.int8).astype(jnp.uint8)
    byte = jnp.zeros_like(jax.lax.slice_in_dim(u, 0, n, 4, axis))
    for j in range(4):
        part = jnp.bitwise_and(jax.lax.slice_in_dim(u, j, n, 4, axis), jnp.uint8(0x03))
        byte = jnp.bitwise_or(byte, jnp.left_shift(part, jnp.uint8(2 * j)))
    return jax.lax.bitcast_convert_type(byte, jnp.int8)


def unpack_int2(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`pack_int2`: int8 codes, four times as long along ``axis``."""
    axis = axis % packed.ndim
    parts = [
        jnp.right_shift(jnp.left_shift(packed, jnp.int8(6 - 2 * j)), jnp.int8(6))  # sign-extends
        for j in range(4)
    ]
    shape = list(packed.shape)
    shape[axis] *= 4
    return jnp.stack(parts, axis=axis + 1).reshape(shape)


def pack_int3(q: jax.Array, axis: int) -> jax.Array:
    """Packs int8 codes in ``[-4, 3]`` eight to three bytes along ``axis`` (length divisible by 8)."""
    axis = axis % q.ndim
    n = q.shape[axis]
    if n % 8:
        raise ValueError(f"cannot pack length {n} eight per three bytes along axis {axis} of shape {q.shape}")
    u = jnp.bitwise_and(q.astype(jnp.int32), 7)
    word = jnp.zeros_like(jax.lax.slice_in_dim(u, 0, n, 8, axis))
    for j in range(8):
        word = jnp.bitwise_or(word, jnp.left_shift(jax.lax.slice_in_dim(u, j, n, 8, axis), 3 * j))
    parts = [jnp.bitwise_and(jnp.right_shift(word, 8 * b), 0xFF) for b in range(3)]
    shape = list(q.shape)
    shape[axis] = n // 8 * 3
    byte = jnp.stack(parts, axis=axis + 1).reshape(shape).astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(byte, jnp.int8)


def unpack_int3(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`pack_int3`: int8 codes, 8/3 times as long along ``axis``."""
    axis = axis % packed.ndim
    m = packed.shape[axis]
    u = jax.lax.bitcast_convert_type(packed, jnp.uint8).astype(jnp.int32)
    bytes3 = [jax.lax.slice_in_dim(u, b, m, 3, axis) for b in range(3)]
    word = bytes3[0] | jnp.left_shift(bytes3[1], 8) | jnp.left_shift(bytes3[2], 16)
    # Shift each field to the top of the int32, then arithmetic-shift back: sign-extends.
    codes = [jnp.right_shift(jnp.left_shift(word, 29 - 3 * j), 29) for j in range(8)]
    shape = list(packed.shape)
    shape[axis] = m // 3 * 8
    return jnp.stack(codes, axis=axis + 1).reshape(shape).astype(jnp.int8)


_PACKERS = {2: (pack_int4, unpack_int4), 4: (pack_int2, unpack_int2), 8: (pack_int3, unpack_int3)}


def pack_codes(q: jax.Array, axis: int, codes_per_unit: int) -> jax.Array:
    """Packs codes by the format's unit: 2 per byte (int4/nf4), 4 per byte (int2), 8 per 3 bytes (int3)."""
    return _PACKERS[codes_per_unit][0](q, axis)


def unpack_codes(packed: jax.Array, axis: int, codes_per_unit: int) -> jax.Array:
    """Inverse of :func:`pack_codes`."""
    return _PACKERS[codes_per_unit][1](packed, axis)
