"""`DecoderConfig`: one frozen description of every decoder-only LM that :mod:`decoder` builds.

The architectures differ in a handful of switches (QKV bias, QK-norm, Gemma's ``(1 + w)`` norms,
post-norms, GeGLU, embedding scale, soft-capping, sliding windows, RoPE layout and scaling), so
one config with those switches replaces a class per family. Checkpoint readers
(:mod:`jaxq.lm.hf`, :mod:`jaxq.lm.gguf`) translate their own metadata into it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
"""The ``arch`` values :class:`DecoderConfig` accepts (HF ``model_type`` names)."""

ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_KINDS = ("global", "sliding")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``"linear"`` (positions / factor) or ``"llama3"`` (NTK-by-parts).

    Llama-3's rule keeps high frequencies, divides low ones by ``factor`` and interpolates in
    between, with the wavelength bounds set by ``original_max_position_embeddings``.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling type {self.kind!r} is not supported; supported: 'linear', 'llama3'")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters and architecture switches of a decoder-only transformer LM.

    Attributes:
      arch: family (see :data:`ARCHITECTURES`); informative, every behaviour has its own switch.
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
        sizes (grouped-query attention when ``num_kv_heads < num_heads``).
      rms_norm_eps: RMSNorm epsilon.
      norm_plus_one: RMSNorm multiplies by ``1 + w`` (Gemma's HF layout) instead of ``w``.
      rope_theta: RoPE base of global layers; ``rope_local_theta`` that of sliding layers
        (Gemma 3), ``None`` = the same.
      rope_scaling: optional :class:`RopeScaling` (global layers only, as in HF).
      rope_interleaved: rotate adjacent pairs ``(x[2i], x[2i+1])`` (llama.cpp's permuted Q/K rows
        in Llama GGUF files) instead of HF's rotate-half pairs ``(x[i], x[i + d/2])``.
      qkv_bias: q/k/v projections have biases (Qwen2).
      qk_norm: RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3).
      post_norms: Gemma's extra norms after attention and after the MLP (and a pre-MLP norm).
      activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU with tanh-approximate GELU).
      embed_scale: multiply embeddings by ``sqrt(hidden_size)`` (Gemma).
      query_scale: factor on ``q . k``; ``None`` = ``head_dim ** -0.5`` (Gemma: ``query_pre_attn_scalar ** -0.5``).
      attn_softcap, final_softcap: ``cap * tanh(x / cap)`` on attention / output logits (Gemma 2).
      sliding_window: window of sliding layers (a query attends to the last ``sliding_window``
        positions, itself included).
      layer_kinds: ``"global"`` or ``"sliding"`` per layer; empty = all global.
      max_position_embeddings: context length the model was trained for.
      tie_word_embeddings: the output head is the transposed token embedding (stored once).
      bos_token_id, eos_token_ids, pad_token_id: special ids (``None`` when absent).
      add_bos: prompts start with BOS (Llama 2, Gemma); the tokenizer may already add it.
    """

    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    norm_plus_one: bool = False
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    rope_interleaved: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    activation: str = "silu"
    embed_scale: bool = False
    query_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_kinds: tuple[str, ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos: bool = False

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; supported: {ACTIVATIONS}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        kinds = tuple(self.layer_kinds)
        object.__setattr__(self, "layer_kinds", kinds)
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if kinds:
            if len(kinds) != self.num_layers:
                raise ValueError(f"layer_kinds has {len(kinds)} entries for {self.num_layers} layers")
            bad = sorted(set(kinds) - set(LAYER_KINDS))
            if bad:
                raise ValueError(f"unknown layer kinds {bad}; use {LAYER_KINDS}")
            if "sliding" in kinds and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
                raise ValueError("sliding layers need a positive sliding_window")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    # --- derived ---------------------------------------------------------------------------
    def layer_kind(self, i: int) -> str:
        """``"global"`` or ``"sliding"`` for layer ``i``."""
        return self.layer_kinds[i] if self.layer_kinds else "global"

    def window(self, kind: str) -> int | None:
        """Attention window of a layer of ``kind`` (``None`` = the whole causal prefix)."""
        return self.sliding_window if kind == "sliding" else None

    def theta(self, kind: str) -> float:
        """RoPE base of a layer of ``kind``."""
        if kind == "sliding" and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def scaling(self, kind: str) -> RopeScaling | None:
        """RoPE scaling of a layer of ``kind`` (Gemma 3's local layers have none)."""
        if kind == "sliding" and self.rope_local_theta is not None:
            return None
        return self.rope_scaling

    @property
    def scale_queries(self) -> float:
        return self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (``None`` when the model has none)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def num_parameters(self) -> int:
        """Parameter count of the tree :class:`~jaxq.models.decoder.Decoder` builds."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        per = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        per += (q + 2 * kv) if self.qkv_bias else 0
        per += 2 * hd if self.qk_norm else 0
        per += 2 * d if self.post_norms else 0
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * per + self.vocab_size * d + d + head

    # --- serialisation (stored with jaxq checkpoints) -------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_kinds"] = list(self.layer_kinds)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DecoderConfig keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for k in ("layer_kinds", "eos_token_ids"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
