"""One decoder-only LM for the Llama, Qwen2/Qwen3 and Gemma 2/3 families, sized by :class:`DecoderConfig`.

Every weight matmul is a :class:`jaxq.models.layers.Dense` (kernel ``[in, out]``), so a tree from
:func:`jaxq.quantize` or the sequential driver serves directly, and the ``dense_inputs``
collection captures each Dense's input for calibration. Parameter tree::

    embed_tokens/embedding             [V, D]   (absent when tied: the head kernel is read instead)
    layers_{i}/attn_norm/scale         [D]
    layers_{i}/attn/{q,k,v}_proj/kernel (+ bias when qkv_bias), o_proj/kernel
    layers_{i}/attn/{q,k}_norm/scale   [hd]     (qk_norm)
    layers_{i}/post_attn_norm/scale    [D]      (post_norms)
    layers_{i}/mlp_norm/scale          [D]
    layers_{i}/mlp/{gate,up}_proj/kernel [D, F], down_proj/kernel [F, D]
    layers_{i}/post_mlp_norm/scale     [D]      (post_norms)
    norm/scale                         [D]
    lm_head/kernel                     [D, V]

With tied embeddings the table is stored once, as ``lm_head/kernel`` ``[D, V]``: the head is an
ordinary Dense that quantizes like any other, and the token lookup gathers its columns
(:func:`jaxq.ops.take`), so a quantized head is a quantized embedding too.

``Decoder(cfg).apply({'params': p}, tokens)`` gives float32 logits ``[B, T, V]``; with
``cache=`` a :class:`~jaxq.models.kv_cache.KVCache` it also returns the updated cache (prefill
and decode steps, see :mod:`jaxq.lm.generate`). The block protocol of the sequential driver
(:mod:`jaxq.algorithms.sequential`) is here too: :meth:`Decoder.block_module`,
:meth:`Decoder.num_blocks`, :meth:`Decoder.block_layout`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.algorithms.layouts import DenseFold, InputGroup, NormFold
from jaxq.flax.linen import QuantLayerMixin
from jaxq.models import kv_cache as kvc
from jaxq.models.decoder_config import DecoderConfig, RopeScaling
from jaxq.models.layers import Dtype, make_dense
from jaxq.ops.gather import take


class Attend(NamedTuple):
    """Where the queries of a call sit and which keys they may see.

    ``q_pos [B, T]`` positions of the new tokens; ``k_pos [B, S]`` / ``k_valid [B, S]`` those of
    the keys (``S = T`` without a cache); ``index`` the cache slot of the first new token.
    """

    q_pos: jax.Array
    k_pos: jax.Array
    k_valid: jax.Array
    index: jax.Array | None = None


def plain_attend(batch: int, length: int) -> Attend:
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return Attend(pos, pos, jnp.ones((batch, length), bool))


# --- numerics shared by the layers ---------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies ``[head_dim / 2]``, with linear or Llama-3 scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, pos: jax.Array, inv_freq: jax.Array, interleaved: bool) -> jax.Array:
    """Rotates ``x [B, T, H, hd]`` at positions ``pos [B, T]``.

    Rotate-half pairs ``(i, i + hd/2)`` (HF), or adjacent pairs ``(2i, 2i+1)`` (``interleaved``:
    llama.cpp's permuted Q/K rows in Llama GGUF files).
    """
    ang = pos.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, hd/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    if interleaved:
        a, b = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        a, b = x32[..., :half], x32[..., half:]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, at: Attend, *, scale: float,
              window: int | None, cap: float | None) -> jax.Array:
    """Grouped-query attention of ``q [B, T, Hq, hd]`` over ``k, v [B, S, Hkv, hd]``.

    A query at position ``p`` sees valid keys at positions ``p - window < k_pos <= p``. Logits and
    softmax are float32; query head ``h`` reads KV head ``h // (Hq / Hkv)`` (HF ``repeat_kv``).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k.astype(jnp.float32)) * scale
    logits = softcap(logits, cap)
    qp, kp = at.q_pos[:, :, None], at.k_pos[:, None, :]
    mask = (kp <= qp) & at.k_valid[:, None, :]
    if window is not None:
        mask &= qp - kp < window
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


class RMSNorm(QuantLayerMixin, nn.Module):
    """RMSNorm over the last axis, statistics in float32; ``plus_one`` = Gemma's ``(1 + w)``."""

    eps: float = 1e-6
    plus_one: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        w = self.param("scale", init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y * (1.0 + w if self.plus_one else w)
        return y.astype(self.dtype or x.dtype)


class _Base(nn.Module):
    config: DecoderConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    dense_kwargs: Mapping[str, Any] = flax.core.FrozenDict()

    def _dense(self, features: int, name: str, use_bias: bool = False) -> nn.Dense:
        return make_dense(features, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
                          dense_kwargs=self.dense_kwargs, use_bias=use_bias)

    def _norm(self, name: str) -> RMSNorm:
        c = self.config
        return RMSNorm(c.rms_norm_eps, c.norm_plus_one, self.dtype, self.param_dtype, name=name)


class DecoderAttention(_Base):
    """Self-attention of a ``kind`` layer: projections, QK-norm, RoPE, cache write and read."""

    kind: str = "global"

    @nn.compact
    def __call__(self, x: jax.Array, at: Attend, cache: kvc.LayerCache | None, kind: str):
        c, lk = self.config, self.kind
        b, t, _ = x.shape
        hd = c.head_dim
        q = self._dense(c.num_heads * hd, "q_proj", c.qkv_bias)(x).reshape(b, t, c.num_heads, hd)
        k = self._dense(c.num_kv_heads * hd, "k_proj", c.qkv_bias)(x).reshape(b, t, c.num_kv_heads, hd)
        v = self._dense(c.num_kv_heads * hd, "v_proj", c.qkv_bias)(x).reshape(b, t, c.num_kv_heads, hd)
        if c.qk_norm:
            q, k = self._norm("q_norm")(q), self._norm("k_norm")(k)
        inv = rope_inv_freq(hd, c.theta(lk), c.scaling(lk))
        q = apply_rope(q, at.q_pos, inv, c.rope_interleaved)
        k = apply_rope(k, at.q_pos, inv, c.rope_interleaved)
        if cache is not None:
            cache = kvc.write(cache, k, v, at.index, kind)
            k, v = kvc.read(cache, q.dtype)
        out = attention(q, k, v, at, scale=c.scale_queries, window=c.window(lk), cap=c.attn_softcap)
        return self._dense(c.hidden_size, "o_proj")(out.reshape(b, t, c.num_heads * hd)), cache


class DecoderMLP(_Base):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))`` with SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = self._dense(c.intermediate_size, "gate_proj")(x)
        up = self._dense(c.intermediate_size, "up_proj")(x)
        act = nn.silu(gate) if c.activation == "silu" else nn.gelu(gate, approximate=True)
        return self._dense(c.hidden_size, "down_proj")(act * up)


class DecoderBlock(_Base):
    """One pre-norm block (Gemma: with post-norms). Standalone: ``block.apply({'params': p}, h)``.

    ``kind`` (``"global"`` or ``"sliding"``) sets the attention window and RoPE base, so blocks of
    one kind are equal modules and share compiled code.
    """

    kind: str = "global"

    @nn.compact
    def __call__(self, h: jax.Array, at: Attend | None = None, cache: kvc.LayerCache | None = None,
                 kind: str = "float"):
        c = self.config
        at = plain_attend(h.shape[0], h.shape[1]) if at is None else at
        attn = DecoderAttention(c, self.dtype, self.param_dtype, self.dense_kwargs, self.kind, name="attn")
        a, new_cache = attn(self._norm("attn_norm")(h), at, cache, kind)
        if c.post_norms:
            a = self._norm("post_attn_norm")(a)
        h = h + a
        m = DecoderMLP(c, self.dtype, self.param_dtype, self.dense_kwargs, name="mlp")(self._norm("mlp_norm")(h))
        if c.post_norms:
            m = self._norm("post_mlp_norm")(m)
        h = h + m
        return h if cache is None else (h, new_cache)


class Embedding(QuantLayerMixin, nn.Module):
    """Token lookup in a ``[V, D]`` table (float or QArray); ``embed_scale`` multiplies by sqrt(D)."""

    num_embeddings: int
    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features),
                           self.param_dtype)
        return take(table, ids, axis=0)


class Decoder(_Base):
    """Causal LM: ``tokens [B, T] int32 -> float32 logits [B, T, V]`` (and a cache, when given one)."""

    def setup(self) -> None:
        c = self.config
        if not c.tie_word_embeddings:
            self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, self.param_dtype)
        self.layers = [
            DecoderBlock(c, self.dtype, self.param_dtype, self.dense_kwargs, kind=c.layer_kind(i))
            for i in range(c.num_layers)
        ]
        self.norm = RMSNorm(c.rms_norm_eps, c.norm_plus_one, self.dtype, self.param_dtype)
        self.lm_head = self._dense(c.vocab_size, "lm_head")

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids ``[B, T]`` -> block-0 input ``[B, T, D]`` (Gemma: times sqrt(D))."""
        c = self.config
        if c.tie_word_embeddings:
            if self.is_initializing():  # create the head kernel that the lookup reads
                self.lm_head(jnp.zeros((1, c.hidden_size), self.param_dtype))
            kernel = self.lm_head.variables["params"]["kernel"]
            h = jnp.moveaxis(take(kernel, tokens, axis=1), 0, -1)  # [D, B, T] -> [B, T, D]
        else:
            h = self.embed_tokens(tokens)
        h = h.astype(self.dtype or jnp.float32)
        if c.embed_scale:
            h = h * jnp.asarray(math.sqrt(c.hidden_size), h.dtype)
        return h

    def head(self, h: jax.Array) -> jax.Array:
        """Last block's output -> float32 logits (final soft-capping when configured)."""
        logits = self.lm_head(self.norm(h)).astype(jnp.float32)
        return softcap(logits, self.config.final_softcap)

    def __call__(self, tokens: jax.Array, cache: kvc.KVCache | None = None, last_only: bool = False):
        """Logits of every position (``last_only``: of the last one, ``[B, 1, V]``)."""
        h = self.embed(tokens)
        b, t = tokens.shape
        if cache is None:
            at = plain_attend(b, t)
            for layer in self.layers:
                h = layer(h, at)
            return self.head(h[:, -1:] if last_only else h)
        k_pos, k_valid = kvc.slot_positions(cache)
        slots = cache.index + jnp.arange(t, dtype=jnp.int32)
        q_pos = jnp.maximum(slots[None, :] - cache.start[:, None], 0)
        k_valid = k_valid & (jnp.arange(cache.max_len)[None, :] < cache.index + t)
        at = Attend(q_pos, k_pos, k_valid, cache.index)
        layers = []
        for layer, lc in zip(self.layers, cache.layers):
            h, lc = layer(h, at, lc, cache.kind)
            layers.append(lc)
        new = kvc.KVCache(tuple(layers), cache.index + t, cache.start, cache.kind)
        return self.head(h[:, -1:] if last_only else h), new

    # --- the sequential driver's block protocol -------------------------------------------
    @nn.nowrap
    def num_blocks(self) -> int:
        return self.config.num_layers

    @nn.nowrap
    def block_module(self, i: int = 0) -> DecoderBlock:
        """An unbound block ``i`` (its window and RoPE base depend on the layer's kind)."""
        c = self.config
        return DecoderBlock(c, self.dtype, self.param_dtype, self.dense_kwargs, kind=c.layer_kind(i), parent=None)

    @nn.nowrap
    def block_layout(self, i: int = 0) -> tuple[InputGroup, ...]:
        """Input groups of block ``i`` and where AWQ/SmoothQuant scales fold.

        q/k/v read ``attn_norm``'s output; gate/up read ``mlp_norm``'s. QK-norm and post-norms do
        not sit between a fold and its group, so the folds are exact for every family here.
        ``o_proj``'s input is ``v_proj``'s output mixed over positions, so its scale folds into
        ``v_proj``'s columns (tied across the query heads of a KV group). ``down_proj``'s input
        is ``act(gate) * up``, linear in ``up``, so its scale folds into ``up_proj``.
        """
        c = self.config
        return (
            InputGroup("attn_in", (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")),
                       NormFold(("attn_norm",), c.norm_plus_one)),
            InputGroup("attn_out", (("attn", "o_proj"),),
                       DenseFold(("attn", "v_proj"), c.num_heads // c.num_kv_heads, c.head_dim)),
            InputGroup("mlp_in", (("mlp", "gate_proj"), ("mlp", "up_proj")), NormFold(("mlp_norm",), c.norm_plus_one)),
            InputGroup("mlp_out", (("mlp", "down_proj"),), DenseFold(("mlp", "up_proj"))),
        )

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int, kind: str = "float", start: jax.Array | None = None,
                   dtype: Any = None) -> kvc.KVCache:
        """An empty :class:`~jaxq.models.kv_cache.KVCache` for this model."""
        c = self.config
        return kvc.init_cache(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, kind,
                              dtype or self.dtype or jnp.float32, start)
