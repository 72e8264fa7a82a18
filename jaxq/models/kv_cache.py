"""A preallocated key/value cache for decoding, in float or quantized (int8, fp8 e4m3) storage.

Shapes are static: ``[B, S, Hkv, hd]`` per layer for ``S`` slots, so a prefill and a decode step
each compile once per batch size and length bucket. All rows share one write position
(``index``); a row whose prompt is shorter is *left*-padded and ``start[b]`` is the slot of its
first real token, so token positions are ``slot - start[b]`` and slots before ``start[b]`` are
never attended to.

Quantized caches store codes and one float32 scale per token and KV head (symmetric absmax over
the head dimension): ``int8`` maps the absmax onto 127, ``fp8`` onto e4m3's 448. Attention reads
the dequantized values, for the prompt as for every later token, so a perplexity measured
through the cache is the quantized cache's.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxq.numerics import codec
from jaxq.numerics.formats import get_format

KV_KINDS = ("float", "int8", "fp8")
_FORMAT = {"int8": "int8", "fp8": "fp8_e4m3"}


@flax.struct.dataclass
class LayerCache:
    """One layer's keys and values (codes for quantized kinds) and their scales."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


@flax.struct.dataclass
class KVCache:
    """Every layer's :class:`LayerCache`, the next write slot, and each row's first slot."""

    layers: tuple[LayerCache, ...]
    index: jax.Array  # int32 scalar
    start: jax.Array  # int32 [B]
    kind: str = flax.struct.field(pytree_node=False, default="float")

    @property
    def max_len(self) -> int:
        return int(self.layers[0].k.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys, values and scales."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.layers)))


def check_kind(kind: str) -> str:
    if kind not in KV_KINDS:
        raise ValueError(f"unknown kv_cache {kind!r}; choose one of {KV_KINDS}")
    return kind


def init_cache(
    num_layers: int,
    batch: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    kind: str = "float",
    dtype: Any = jnp.float32,
    start: jax.Array | None = None,
) -> KVCache:
    """An empty cache of ``max_len`` slots; ``start`` = left-padding per row (default 0)."""
    check_kind(kind)
    shape = (batch, max_len, num_kv_heads, head_dim)
    if kind == "float":
        store, sshape = jnp.dtype(dtype), None
    else:
        store, sshape = get_format(_FORMAT[kind]).storage_dtype, (batch, max_len, num_kv_heads, 1)

    def layer() -> LayerCache:
        zeros = lambda s, d: None if s is None else jnp.zeros(s, d)  # noqa: E731
        return LayerCache(
            jnp.zeros(shape, store), jnp.zeros(shape, store),
            zeros(sshape, jnp.float32), zeros(sshape, jnp.float32),
        )

    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return KVCache(tuple(layer() for _ in range(num_layers)), jnp.int32(0), start, kind)


def _encode(x: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    fmt = get_format(_FORMAT[kind])
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale, _ = codec.scale_and_zero_point(-amax, amax, fmt, True)
    return codec.encode(x32, scale, None, fmt, True), scale


def write(layer: LayerCache, k: jax.Array, v: jax.Array, index: jax.Array, kind: str) -> LayerCache:
    """Stores ``k``/``v`` ``[B, T, Hkv, hd]`` at slots ``index .. index + T - 1``."""

    def put(buf, x):
        return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), index, axis=1)

    if kind == "float":
        return LayerCache(put(layer.k, k), put(layer.v, v))
    kq, ks = _encode(k, kind)
    vq, vs = _encode(v, kind)
    return LayerCache(put(layer.k, kq), put(layer.v, vq), put(layer.k_scale, ks), put(layer.v_scale, vs))


def read(layer: LayerCache, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Keys and values of every slot, dequantized to ``dtype``."""
    if layer.k_scale is None:
        return layer.k.astype(dtype), layer.v.astype(dtype)
    k = (layer.k.astype(jnp.float32) * layer.k_scale).astype(dtype)
    v = (layer.v.astype(jnp.float32) * layer.v_scale).astype(dtype)
    return k, v


def slot_positions(cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """``(positions [B, S], valid [B, S])`` of every slot before any write of this step."""
    s = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]
    return s - cache.start[:, None], s >= cache.start[:, None]


def cache_bytes(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, kind: str,
                dtype: Any = jnp.float32) -> int:
    """Bytes a cache of this size takes (without building it)."""
    check_kind(kind)
    n = num_layers * 2 * batch * max_len * num_kv_heads
    if kind == "float":
        return n * head_dim * np.dtype(dtype).itemsize
    return n * (head_dim * get_format(_FORMAT[kind]).storage_dtype.itemsize + 4)
