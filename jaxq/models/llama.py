"""A Flax linen Llama (GQA attention, RoPE, SwiGLU, RMSNorm), sized by :class:`LlamaConfig`.

Built to load HF Llama checkpoints (see :mod:`jaxq.models.llama_weights`, e.g. the real
TinyStories-656K model) and to be quantized later:

* Every weight matmul is a :class:`jaxq.models.layers.Dense` (an ``nn.Dense`` subclass,
  ``use_bias=False``, kernel layout ``[in, out]``); the ``dense_kwargs`` field is splatted into
  each of them, e.g. ``Llama(cfg, dense_kwargs=FrozenDict(dot_general=my_dot))``. Attention
  logits, softmax and RoPE are plain ``jnp``.
* Parameter tree (``model.apply({'params': params}, tokens)``)::

      embed_tokens/embedding            [V, D]   token lookup (stays float)
      layers_{i}/attn_norm/scale        [D]
      layers_{i}/attn/{q,k,v,o}_proj/kernel      q: [D, Hq*hd], k/v: [D, Hkv*hd], o: [Hq*hd, D]
      layers_{i}/mlp_norm/scale         [D]
      layers_{i}/mlp/{gate,up}_proj/kernel [D, F], mlp/down_proj/kernel [F, D]
      norm/scale                        [D]
      lm_head/kernel                    [D, V]

  Tied embeddings (``tie_word_embeddings``) are stored *twice*: ``embed_tokens/embedding`` and
  ``lm_head/kernel = embedding.T``. The duplication is deliberate: the output projection is then
  an ordinary Dense that the quantizer can treat like any other, while the embedding lookup
  (a gather, not a matmul) stays in float. The two copies are only tied at load time; training
  would let them drift apart.

Block-by-block application (for layer-wise algorithms such as GPTQ): the model is
``embed -> layers_0 ... layers_{L-1} -> head``, each stage reachable on its own::

    h = model.apply({'params': params}, tokens, method=Llama.embed)      # [B, T, D]
    block = model.block_module()                                          # unbound LlamaBlock
    h = block.apply({'params': params['layers_0']}, h)                    # one block
    logits = model.apply({'params': params}, h, method=Llama.head)

:mod:`jaxq.models.blocks` wraps exactly this (``embed``, ``apply_block``, ``head``) for any
model in this package. To capture the input of every Dense inside a block, make the
``'dense_inputs'`` collection mutable (see :mod:`jaxq.models.layers`)::

    h_out, state = block.apply({'params': p}, h, mutable=['dense_inputs'])
    state['dense_inputs']['attn']['q_proj']['inputs'][0]    # [B, T, D]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.algorithms.layouts import llama_layout
from jaxq.models.layers import (
    Dtype,
    RMSNorm,
    apply_rope,
    causal_attention,
    make_dense,
    rope_cos_sin,
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters (HF names are mapped by :meth:`from_hf_config`)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def context_length(self) -> int:
        """Longest sequence the model was trained for (used by generation windows)."""
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """Build from a HF ``config.json`` dict of a ``LlamaForCausalLM``."""
        if hf.get("rope_scaling"):
            raise NotImplementedError(f"rope_scaling={hf['rope_scaling']!r} is not supported")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise NotImplementedError("biased Llama projections are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={hf['hidden_act']!r} is not supported")
        num_heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=int(hf.get("bos_token_id", 1)),
            eos_token_id=int(hf.get("eos_token_id", 2)),
        )


class _Base(nn.Module):
    """Fields shared by every Llama submodule."""

    config: LlamaConfig
    dtype: Dtype | None = None  # compute dtype; None = follow inputs / params
    param_dtype: Dtype = jnp.float32
    dense_kwargs: Mapping[str, Any] = flax.core.FrozenDict()  # splatted into every Dense

    def _dense(self, features: int, name: str) -> nn.Dense:
        return make_dense(
            features,
            name=name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dense_kwargs=self.dense_kwargs,
        )

    def _sub(self, cls: type[nn.Module], name: str) -> nn.Module:
        return cls(self.config, self.dtype, self.param_dtype, self.dense_kwargs, name=name)


class LlamaAttention(_Base):
    """GQA self-attention with RoPE; ``q/k/v/o_proj`` are Dense layers."""

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        q = self._dense(c.num_heads * c.head_dim, "q_proj")(x).reshape(b, t, c.num_heads, -1)
        k = self._dense(c.num_kv_heads * c.head_dim, "k_proj")(x).reshape(b, t, c.num_kv_heads, -1)
        v = self._dense(c.num_kv_heads * c.head_dim, "v_proj")(x).reshape(b, t, c.num_kv_heads, -1)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v).reshape(b, t, c.num_heads * c.head_dim)
        return self._dense(c.hidden_size, "o_proj")(out)


class LlamaMLP(_Base):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = self._dense(c.intermediate_size, "gate_proj")(x)
        up = self._dense(c.intermediate_size, "up_proj")(x)
        return self._dense(c.hidden_size, "down_proj")(nn.silu(gate) * up)


class LlamaBlock(_Base):
    """One pre-norm decoder block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``.

    Usable standalone on ``params['layers_i']``: ``LlamaBlock(cfg).apply({'params': p}, h)``.
    """

    @nn.compact
    def __call__(self, h: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        c = self.config
        if positions is None:
            positions = jnp.arange(h.shape[1])
        norm = partial(RMSNorm, c.rms_norm_eps, self.dtype, self.param_dtype)
        h = h + self._sub(LlamaAttention, "attn")(norm(name="attn_norm")(h), positions)
        return h + self._sub(LlamaMLP, "mlp")(norm(name="mlp_norm")(h))


class Llama(_Base):
    """Causal Llama LM: ``tokens [B, T] int32 -> logits [B, T, V] float32``."""

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
        )
        self.layers = [
            LlamaBlock(c, self.dtype, self.param_dtype, self.dense_kwargs)
            for _ in range(c.num_layers)
        ]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        self.lm_head = self._dense(c.vocab_size, "lm_head")

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids ``[B, T]`` -> block-0 input hidden states ``[B, T, D]``."""
        return self.embed_tokens(tokens)

    def head(self, h: jax.Array) -> jax.Array:
        """Last block's output ``[B, T, D]`` -> float32 logits ``[B, T, V]``."""
        return self.lm_head(self.norm(h)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        positions = jnp.arange(tokens.shape[1])
        for layer in self.layers:
            h = layer(h, positions)
        return self.head(h)

    @nn.nowrap
    def block_module(self, i: int = 0) -> LlamaBlock:
        """An unbound :class:`LlamaBlock` with this model's settings (every layer has the same)."""
        return LlamaBlock(self.config, self.dtype, self.param_dtype, self.dense_kwargs, parent=None)

    @nn.nowrap
    def block_layout(self, i: int = 0) -> tuple:
        """Input groups and scale folds of a block (see :mod:`jaxq.algorithms.layouts`)."""
        c = self.config
        return llama_layout(c.num_heads, c.num_kv_heads, c.head_dim)

    @nn.nowrap
    def num_blocks(self) -> int:
        """Number of decoder blocks (``params['layers_0'] ... ['layers_{n-1}']``)."""
        return self.config.num_layers
