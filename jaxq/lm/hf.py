"""Hugging Face safetensors checkpoints <-> :class:`~jaxq.models.decoder.Decoder` params.

A Hugging Face model folder holds ``config.json``, the weights as one ``model.safetensors`` or
as shards listed in ``model.safetensors.index.json`` (its ``weight_map``), and
``tokenizer.json``. Three functions cover it:

* :func:`config_from_hf` translates ``config.json`` (Llama, Mistral without sliding window,
  Qwen2, Qwen3, Gemma 2, Gemma 3 text and multimodal) into a :class:`DecoderConfig`;
* :func:`load_hf` reads the folder tensor by tensor (positioned reads, no memory map: see
  :class:`_SafetensorsFile`),
  transposes HF ``Linear`` weights ``[out, in]`` into Flax kernels ``[in, out]``, casts and,
  with ``quantize=``, quantizes each tensor as soon as it is read, so the float model is never
  held in memory as a whole: peak host memory is the quantized model plus a few copies of the
  largest float tensor (its read buffer, its Flax-layout copy, the quantizer's temporaries);
  e.g. an 800 MB fp32 checkpoint (32000 x 1024 embedding and head) loads as int8 (285 MB,
  embedding kept float) with peak RSS 0.9 GB above the interpreter's;
* :func:`write_hf` is the inverse, for float params (random test checkpoints, exports).

Name mapping (``model.`` prefix; Gemma 3 multimodal checkpoints use ``language_model.model.``
or ``model.language_model.`` and ``language_model.lm_head.``, both are recognised)::

    model.embed_tokens.weight [V, D]              embed_tokens/embedding  (tied: lm_head/kernel = .T)
    model.layers.N.input_layernorm.weight         layers_N/attn_norm/scale
    model.layers.N.self_attn.{q,k,v,o}_proj.weight  layers_N/attn/{q,k,v,o}_proj/kernel (transposed)
    model.layers.N.self_attn.{q,k,v}_proj.bias    layers_N/attn/{q,k,v}_proj/bias   (Qwen2)
    model.layers.N.self_attn.{q,k}_norm.weight    layers_N/attn/{q,k}_norm/scale    (Qwen3, Gemma 3)
    model.layers.N.post_attention_layernorm.weight
        Llama/Qwen: layers_N/mlp_norm/scale (it is the pre-MLP norm)
        Gemma:      layers_N/post_attn_norm/scale
    model.layers.N.pre_feedforward_layernorm.weight   layers_N/mlp_norm/scale       (Gemma)
    model.layers.N.post_feedforward_layernorm.weight  layers_N/post_mlp_norm/scale  (Gemma)
    model.layers.N.mlp.{gate,up,down}_proj.weight layers_N/mlp/{gate,up,down}_proj/kernel (transposed)
    model.norm.weight                             norm/scale
    lm_head.weight [V, D]                         lm_head/kernel [D, V]

Gemma's norm weights stay as stored (the model multiplies by ``1 + w``).

Tied embeddings: the table is read from ``model.embed_tokens.weight`` or, when only the head is
stored (TinyStories-656K), from ``lm_head.weight``; a stored duplicate head is ignored, as HF
ties it to the embedding after loading.

Tensors the mapping does not use: buffers (``*.rotary_emb.inv_freq``) and, for Gemma 3
multimodal checkpoints, the vision tower and projector are skipped silently (this loader reads
the text model). Any other tensor under the decoder's prefix (``model.layers.N.*``,
``model.*``) is an **error**: it is a weight of the computation (an ``o_proj`` bias, an extra
norm) that the config switches do not describe, and dropping it would give a model that runs
but computes something else. Unknown tensors outside the decoder (e.g. a value head) only
raise a :class:`UserWarning`, since the language model itself is complete without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors reads bf16 to numpy)
import numpy as np

from jaxq.models.decoder_config import DecoderConfig, RopeScaling
from jaxq.policy import as_policy, path_str
from jaxq.qarray import is_qarray
from jaxq.quantize import quantize as _quantize_tree

Params = dict[str, Any]
PathLike = str | os.PathLike

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")
"""``config.json`` ``model_type`` values :func:`config_from_hf` reads."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


# HF config-class defaults for keys a real config.json may leave out (sizes of the families'
# default models are *not* defaulted for Llama/Qwen: a config without them is broken).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                  hidden_act="silu"),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                    hidden_act="silu"),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  hidden_act="silu"),
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  hidden_act="silu", head_dim=128),
    "gemma2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                   tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                   hidden_activation="gelu_pytorch_tanh", head_dim=256, num_key_value_heads=4,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3": dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                   max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=2,
                   eos_token_id=1, pad_token_id=0, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                   final_logit_softcapping=None, attn_logit_softcapping=None),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "gemma3": ("hidden_size", "intermediate_size", "num_hidden_layers"),
}
for _f in ("mistral", "qwen2", "qwen3", "gemma2"):
    _REQUIRED[_f] = _REQUIRED["llama"]

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

# Prefixes of the text decoder's tensors, the head's names, and tensors skipped silently.
_DECODER_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
_SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.")
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


# --- config.json -> DecoderConfig ------------------------------------------------------------
def _rope_scaling(d: Any, source: str) -> RopeScaling | None:
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: rope_scaling must be an object or null, got {d!r}")
    kind = d.get("rope_type", d.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(d["factor"]))
    if kind == "llama3":
        try:
            return RopeScaling("llama3", float(d["factor"]), float(d.get("low_freq_factor", 1.0)),
                               float(d.get("high_freq_factor", 4.0)),
                               int(d["original_max_position_embeddings"]))
        except KeyError as e:
            raise ValueError(f"{source}: llama3 rope_scaling is missing key {e.args[0]!r}") from None
    raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; supported: 'linear', 'llama3'")


def _rope(h: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None, float | None]:
    """``(theta, scaling, local_theta)`` from ``rope_theta``/``rope_scaling`` (or v5 ``rope_parameters``)."""
    local_theta = h.get("rope_local_base_freq")
    params = h.get("rope_parameters")
    if isinstance(params, Mapping) and params:
        if "full_attention" in params or "sliding_attention" in params:
            full, local = params.get("full_attention") or {}, params.get("sliding_attention")
            if local is not None:
                if _rope_scaling(local, source) is not None:
                    raise ValueError(f"{source}: RoPE scaling on sliding layers is not supported")
                local_theta = local.get("rope_theta", local_theta)
        else:
            full = params
        return float(full.get("rope_theta", h["rope_theta"])), _rope_scaling(full, source), local_theta
    return float(h["rope_theta"]), _rope_scaling(h.get("rope_scaling"), source), local_theta


def _eos(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))


def _layer_types(h: Mapping[str, Any], family: str, n: int, source: str) -> tuple[str, ...]:
    names = {"sliding_attention": "sliding", "full_attention": "global"}
    lt = h.get("layer_types")
    if lt is not None:
        if len(lt) != n:
            raise ValueError(f"{source}: layer_types has {len(lt)} entries for num_hidden_layers={n}")
        bad = sorted(set(lt) - set(names))
        if bad:
            raise ValueError(f"{source}: unsupported layer_types {bad}; supported: {sorted(names)}")
        return tuple(names[t] for t in lt)
    if family == "gemma2":  # HF Gemma2: `is_sliding = not bool(layer_idx % 2)`
        return tuple("sliding" if i % 2 == 0 else "global" for i in range(n))
    pattern = int(h["sliding_window_pattern"])  # Gemma 3: every `pattern`-th layer is global
    return tuple("sliding" if (i + 1) % pattern else "global" for i in range(n))


def config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_FILE) -> DecoderConfig:
    """A :class:`DecoderConfig` from the dict of an HF ``config.json``.

    Supports ``model_type`` llama, mistral (no sliding window; read as llama), qwen2, qwen3,
    gemma2 and gemma3 / gemma3_text (multimodal Gemma 3 nests its text model under
    ``text_config``). Keys HF's config classes default are defaulted the same way; the model
    sizes are required (for Gemma 3 only hidden/intermediate size and layer count, the others
    have HF defaults that real configs rely on). ``source`` names the file in messages.

    ``add_bos`` is True for Gemma; :func:`load_hf` refines it from the tokenizer files.

    Raises:
      ValueError: unknown ``model_type`` (naming it and the supported ones), a missing required
        key (naming it and ``source``), or a feature this decoder does not implement (a
        non-SiLU Llama/Qwen activation, attention or MLP biases on Llama, Qwen sliding windows,
        Mistral's sliding window, RoPE scaling other than linear/llama3).
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if "model_type" not in hf:
        raise ValueError(f"{source}: missing required key 'model_type' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    mt = hf["model_type"]
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    h = dict(hf)
    if mt == "gemma3" and isinstance(hf.get("text_config"), Mapping):  # multimodal: the text model
        h = dict(hf["text_config"])
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            if k not in h and k in hf:
                h[k] = hf[k]
        source = f"{source} (text_config)"
    family = {"gemma3_text": "gemma3"}.get(mt, mt)
    for k in _REQUIRED[family]:
        if k not in h or h[k] is None:
            raise ValueError(f"{source}: missing required key {k!r} for model_type {mt!r}")
    h = {**_DEFAULTS[family], **h}  # an explicit null stays null (no softcap, no window, no BOS)
    if family == "gemma3" and h.get("sliding_window_pattern") is None:
        h["sliding_window_pattern"] = _DEFAULTS["gemma3"]["sliding_window_pattern"]
    for k in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
              "query_pre_attn_scalar"):
        if k in h and h[k] is None and k in _DEFAULTS[family]:
            h[k] = _DEFAULTS[family][k]

    heads = int(h["num_attention_heads"])
    hidden = int(h["hidden_size"])
    n = int(h["num_hidden_layers"])
    kv = int(h.get("num_key_value_heads") or heads)
    head_dim = h.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                             "and there is no head_dim")
        head_dim = hidden // heads
    theta, scaling, local_theta = _rope(h, source)

    kw: dict[str, Any] = dict(
        vocab_size=int(h["vocab_size"]), hidden_size=hidden, intermediate_size=int(h["intermediate_size"]),
        num_layers=n, num_heads=heads, num_kv_heads=kv, head_dim=int(head_dim),
        rms_norm_eps=float(h["rms_norm_eps"]), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(h["max_position_embeddings"]),
        tie_word_embeddings=bool(h["tie_word_embeddings"]),
        bos_token_id=None if h.get("bos_token_id") is None else int(h["bos_token_id"]),
        eos_token_ids=_eos(h.get("eos_token_id")),
        pad_token_id=None if h.get("pad_token_id") is None else int(h["pad_token_id"]),
    )

    if family in ("llama", "mistral", "qwen2", "qwen3"):
        act = h.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported for {mt}; only 'silu'")
        if family in ("llama", "mistral", "qwen3") and h.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true (biases on q/k/v/o) is not supported for {mt}")
        if h.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported for {mt}")
        if family == "mistral" and h.get("sliding_window") is not None:
            raise ValueError(f"{source}: Mistral with sliding_window={h['sliding_window']} is not supported; "
                             "only sliding_window null (full attention) reads as llama")
        if family in ("qwen2", "qwen3") and h.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported for {mt}")
        return DecoderConfig(arch="llama" if family == "mistral" else family,
                             qkv_bias=family == "qwen2", qk_norm=family == "qwen3", **kw)

    # Gemma 2 / 3
    act = h.get("hidden_activation") or h.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{source}: hidden_activation {act!r} is not supported for {mt}; only 'gelu_pytorch_tanh'")
    if h.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias=true is not supported for {mt}")
    kinds = _layer_types(h, family, n, source)
    window = h.get("sliding_window") if "sliding" in kinds else None
    softcap = lambda k: None if h.get(k) is None else float(h[k])  # noqa: E731
    return DecoderConfig(
        arch=family, norm_plus_one=True, post_norms=True, activation="gelu_tanh", embed_scale=True,
        qk_norm=family == "gemma3", query_scale=float(h["query_pre_attn_scalar"]) ** -0.5,
        attn_softcap=softcap("attn_logit_softcapping"), final_softcap=softcap("final_logit_softcapping"),
        sliding_window=None if window is None else int(window), layer_kinds=kinds,
        rope_local_theta=None if family == "gemma2" or local_theta is None else float(local_theta),
        add_bos=True, **kw)


# --- DecoderConfig -> config.json ------------------------------------------------------------
def _rope_scaling_json(s: RopeScaling | None) -> dict[str, Any] | None:
    if s is None:
        return None
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}


def config_to_hf(cfg: DecoderConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` dict of ``cfg`` (inverse of :func:`config_from_hf`).

    Raises ValueError when ``cfg`` has switches its family's config.json cannot express (e.g. a
    Llama with QK-norm, or llama.cpp's interleaved RoPE layout).
    """
    if cfg.rope_interleaved:
        raise ValueError("rope_interleaved=True (llama.cpp's permuted Q/K rows) has no HF config.json form; "
                         "HF checkpoints use rotate-half RoPE")
    eos = list(cfg.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.arch]],
        "model_type": "gemma3_text" if cfg.arch == "gemma3" else cfg.arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling_json(cfg.rope_scaling),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": cfg.pad_token_id,
        "torch_dtype": torch_dtype, "attention_bias": False,
    }
    if cfg.arch in ("llama", "qwen2", "qwen3"):
        hf["hidden_act"] = "silu"
        if cfg.arch == "llama":
            hf["mlp_bias"] = False
        else:
            hf["use_sliding_window"] = False
            hf["sliding_window"] = None
        if cfg.arch == "qwen2":
            del hf["attention_bias"]
    else:
        q = 1.0 / cfg.scale_queries ** 2
        hf.update({
            "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": round(q) if math.isclose(q, round(q), rel_tol=1e-9) else q,
            "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap,
            "sliding_window": cfg.sliding_window,
            "layer_types": ["sliding_attention" if cfg.layer_kind(i) == "sliding" else "full_attention"
                            for i in range(cfg.num_layers)],
        })
        if cfg.arch == "gemma3":
            hf["rope_local_base_freq"] = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
            for p in range(1, cfg.num_layers + 1):  # also the pattern form older transformers read
                if all((cfg.layer_kind(i) == "sliding") == bool((i + 1) % p) for i in range(cfg.num_layers)):
                    hf["sliding_window_pattern"] = p
                    break
    back = config_from_hf(hf, source="config_to_hf")
    diff = []
    for f in dataclasses.fields(DecoderConfig):
        if f.name == "add_bos":
            continue
        a, b = getattr(cfg, f.name), getattr(back, f.name)
        same = math.isclose(a, b, rel_tol=1e-12) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            diff.append(f"{f.name}={a!r} (a {cfg.arch} config.json gives {b!r})")
    if diff:
        raise ValueError(f"DecoderConfig cannot be written as an HF {cfg.arch} config.json: {'; '.join(diff)}")
    return hf


# --- weight names ----------------------------------------------------------------------------
class HFWeight(NamedTuple):
    """One tensor: its HF name (``model.`` prefix), Flax path, Flax shape, and whether it is transposed."""

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


def hf_weights(cfg: DecoderConfig) -> list[HFWeight]:
    """Every tensor of ``cfg``'s param tree with its HF name, in checkpoint order.

    With tied embeddings the entry for ``lm_head/kernel`` is named ``model.embed_tokens.weight``
    (the loader falls back to ``lm_head.weight``).
    """
    d, v, f, hd = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out: list[HFWeight] = []
    if not cfg.tie_word_embeddings:
        out.append(HFWeight("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, d), False))
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", f"layers_{i}"
        out.append(HFWeight(p + "input_layernorm.weight", (L, "attn_norm", "scale"), (d,), False))
        for name, o in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out.append(HFWeight(p + f"self_attn.{name}.weight", (L, "attn", name, "kernel"), (d, o), True))
            if cfg.qkv_bias:
                out.append(HFWeight(p + f"self_attn.{name}.bias", (L, "attn", name, "bias"), (o,), False))
        out.append(HFWeight(p + "self_attn.o_proj.weight", (L, "attn", "o_proj", "kernel"), (q, d), True))
        if cfg.qk_norm:
            out.append(HFWeight(p + "self_attn.q_norm.weight", (L, "attn", "q_norm", "scale"), (hd,), False))
            out.append(HFWeight(p + "self_attn.k_norm.weight", (L, "attn", "k_norm", "scale"), (hd,), False))
        if cfg.post_norms:
            out.append(HFWeight(p + "post_attention_layernorm.weight", (L, "post_attn_norm", "scale"), (d,), False))
            out.append(HFWeight(p + "pre_feedforward_layernorm.weight", (L, "mlp_norm", "scale"), (d,), False))
            out.append(HFWeight(p + "post_feedforward_layernorm.weight", (L, "post_mlp_norm", "scale"), (d,), False))
        else:
            out.append(HFWeight(p + "post_attention_layernorm.weight", (L, "mlp_norm", "scale"), (d,), False))
        for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
            out.append(HFWeight(p + f"mlp.{name}.weight", (L, "mlp", name, "kernel"), shape, True))
    out.append(HFWeight("model.norm.weight", ("norm", "scale"), (d,), False))
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out.append(HFWeight(head, ("lm_head", "kernel"), (d, v), True))
    return out


# --- reading ---------------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype("<f8")}


class _SafetensorsFile:
    """One ``.safetensors`` file read with positioned reads (``os.pread``), tensor by tensor.

    The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets}}`` and the data. ``safetensors.safe_open`` memory-maps the file instead, and
    every page it touches stays mapped (and counted in the process's RSS) until the file is
    closed, so reading a whole checkpoint through it peaks at the file size however little is
    kept. Positioned reads into a fresh buffer hold one tensor at a time.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError(f"{path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(os.pread(self.fd, n, 8))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a safetensors file ({e})") from None
        except BaseException:
            os.close(self.fd)
            raise
        header.pop("__metadata__", None)
        self.header, self.start, self.size = header, 8 + n, size

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {info['dtype']}; expected a float tensor "
                             "(F32, BF16 or F16): quantized HF formats are not read here")
        dt = _ST_DTYPES[info["dtype"]]
        shape = self.shape(name)
        begin, end = (int(o) for o in info["data_offsets"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if end - begin != nbytes or self.start + end > self.size:
            raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes at offsets "
                             f"[{begin}, {end}) for shape {shape} {info['dtype']}; the file is corrupt or truncated")
        out = np.empty(shape, dt)
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < nbytes:
            k = os.preadv(self.fd, [view[done:]], self.start + begin + done)
            if k <= 0:
                raise ValueError(f"{self.path}: unexpected end of file in tensor {name!r}")
            done += k
        return out


class _Checkpoint:
    """The safetensors files of a folder (single file or index + shards), a name -> file map."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        self._stack, self._files = stack, {}
        index, single = folder / INDEX_FILE, folder / WEIGHTS_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            self.where = {k: folder / v for k, v in wm.items()}
            missing = sorted({str(p) for p in self.where.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
        elif single.is_file():
            self.where = {k: single for k in self._file(single).header}
        else:
            raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} and no {INDEX_FILE} (sharded weights); "
                                    "only safetensors checkpoints are supported")
        self.files = sorted({p.name for p in self.where.values()})

    def _file(self, path: Path) -> _SafetensorsFile:
        if path not in self._files:
            f = _SafetensorsFile(path)
            self._stack.callback(f.close)
            self._files[path] = f
        return self._files[path]

    def _lookup(self, name: str) -> _SafetensorsFile:
        f = self._file(self.where[name])
        if name not in f.header:
            raise ValueError(f"{INDEX_FILE} maps {name!r} to {f.path.name}, which does not contain it")
        return f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._lookup(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._lookup(name).get(name)


def _resolve_prefix(ckpt: _Checkpoint) -> str:
    for p in _DECODER_PREFIXES:
        if f"{p}norm.weight" in ckpt or any(k.startswith(p + "layers.") for k in ckpt.where):
            return p
    return "model."


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _nest(path: tuple[str, ...], value: Any) -> dict:
    tree: dict = {}
    _set(tree, path, value)
    return tree


def load_hf(
    path: PathLike,
    *,
    dtype: Any = None,
    quantize: Any = None,
    tokenizer: bool = True,
) -> tuple[DecoderConfig, Params, Any]:
    """Loads an HF folder: ``(cfg, params, tokenizer)`` for :class:`~jaxq.models.decoder.Decoder`.

    Args:
      path: folder with ``config.json``, ``model.safetensors`` (or shards with
        ``model.safetensors.index.json``) and ``tokenizer.json``.
      dtype: cast every tensor to this float dtype (default: keep the stored fp32/bf16/fp16).
      quantize: a jaxq policy, rules or preset name; each tensor is quantized as soon as it is
        read (the float tree is never complete in memory). The result equals
        ``jaxq.quantize(load_hf(path, dtype=dtype)[1], quantize)`` leaf for leaf: each tensor
        goes through :func:`jaxq.quantize` as a one-leaf tree at its own path.
      tokenizer: read ``tokenizer.json`` (False: skip it and return ``None``).

    Returns:
      ``cfg`` (:func:`config_from_hf`, with ``eos_token_ids`` extended by
      ``generation_config.json``; ``add_bos`` = prompts start with BOS, from
      ``tokenizer_config.json``'s ``add_bos_token``, else True when the tokenizer prepends BOS
      itself, else the family's default: Gemma True, others False),
      ``params`` (nested dict of ``jax.Array`` / :class:`~jaxq.QArray`), and a
      ``tokenizers.Tokenizer``.

    Raises:
      FileNotFoundError: no ``config.json`` / weights / ``tokenizer.json`` in the folder.
      ValueError: bad config (see :func:`config_from_hf`), a missing tensor (named, with the files
        searched), a tensor of the wrong shape (name, expected and found), a non-float tensor, or
        unknown tensors inside the decoder (see the module docstring; others warn).
    """
    folder = Path(path)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no {CONFIG_FILE}; an HF model folder must contain {CONFIG_FILE}, {WEIGHTS_FILE} "
            f"(or {INDEX_FILE} with its shards) and {TOKENIZER_FILE}")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, source=str(cfg_file))
    policy = None if quantize is None else as_policy(quantize)
    np_dtype = None
    if dtype is not None:
        np_dtype = np.dtype(dtype)
        if not jnp.issubdtype(np_dtype, jnp.floating):
            raise ValueError(f"dtype must be a float dtype, got {np_dtype}")

    tok = None
    if tokenizer:
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE}; pass tokenizer=False to load the weights only")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))

    params: Params = {}
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(folder, stack)
        prefix = _resolve_prefix(ckpt)
        head_name = next((n for n in _HEAD_NAMES if n in ckpt), None)
        used: set[str] = set()

        def actual(name: str) -> str:
            if name == "lm_head.weight":
                return head_name or name
            return prefix + name[len("model."):]

        for w in hf_weights(cfg):
            name = actual(w.hf)
            if name not in ckpt and cfg.tie_word_embeddings and w.path == ("lm_head", "kernel") and head_name:
                name = head_name  # tied, only the head stored (TinyStories-656K)
            if name not in ckpt:
                extra = " (embeddings are tied: lm_head.weight would do too)" if w.path == ("lm_head", "kernel") and cfg.tie_word_embeddings else ""
                raise ValueError(f"{folder}: checkpoint is missing tensor {name!r}{extra}; "
                                 f"searched {', '.join(ckpt.files)}")
            found = ckpt.shape(name)
            if found != w.hf_shape:
                raise ValueError(f"{folder}: tensor {name!r} has shape {found}, expected {w.hf_shape} "
                                 f"(from {CONFIG_FILE}: {cfg.arch}, hidden {cfg.hidden_size}, "
                                 f"vocab {cfg.vocab_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim})")
            x = ckpt.get(name)
            used.add(name)
            if w.transpose:
                x = x.T
            if np_dtype is not None and x.dtype != np_dtype:
                x = x.astype(np_dtype)
            arr = jnp.asarray(x)
            del x
            if policy is not None:
                arr = _quantize_tree(_nest(w.path, arr), policy)
                for k in w.path:
                    arr = arr[k]
            _set(params, w.path, arr)
            del arr

        if cfg.tie_word_embeddings:  # the stored duplicate head of a tied model (HF re-ties it)
            used.update(n for n in _HEAD_NAMES if n in ckpt)
        unused = [k for k in ckpt.where if k not in used and not k.endswith(_SKIPPED_SUFFIXES)
                  and not k.startswith(_SKIPPED_PREFIXES)]
        inside = [k for k in unused if k.startswith(prefix)]
        if inside:
            raise ValueError(
                f"{folder}: tensors {sorted(inside)[:8]}{' ...' if len(inside) > 8 else ''} ({len(inside)} in all) "
                f"are part of the decoder but not of the {cfg.arch} layout described by {CONFIG_FILE}; "
                "refusing to drop them silently (the model would compute something else)")
        if unused:
            warnings.warn(f"{folder}: ignoring {len(unused)} tensors outside the decoder: {sorted(unused)[:8]}",
                          stacklevel=2)

    cfg = _refine_special_tokens(cfg, folder, tok)
    return cfg, params, tok


def _refine_special_tokens(cfg: DecoderConfig, folder: Path, tok: Any) -> DecoderConfig:
    eos = list(cfg.eos_token_ids)
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            for i in _eos(json.loads(gen.read_text()).get("eos_token_id")):
                if i not in eos:
                    eos.append(i)
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    add_bos = cfg.add_bos
    if tok is not None and cfg.bos_token_id is not None and tok.encode("a").ids[:1] == [cfg.bos_token_id]:
        add_bos = True  # the tokenizer's post-processor prepends it: the model was trained with it
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            v = json.loads(tc.read_text()).get("add_bos_token")
            add_bos = bool(v) if v is not None else add_bos
        except json.JSONDecodeError:
            pass
    if cfg.bos_token_id is None:
        add_bos = False
    return dataclasses.replace(cfg, eos_token_ids=tuple(eos), add_bos=add_bos)


# --- writing ---------------------------------------------------------------------------------
def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            raise KeyError("/".join(path))
        tree = tree[k]
    return tree


def write_hf(
    path: PathLike,
    cfg: DecoderConfig,
    params: Params,
    tokenizer: Any = None,
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes float ``params`` of ``cfg`` as an HF folder (inverse of :func:`load_hf`).

    Writes ``config.json`` (:func:`config_to_hf`, HF keys of the family), the weights (HF names,
    ``[out, in]`` Linear layout) as ``model.safetensors`` or, when ``max_shard_bytes`` is given
    and exceeded, as ``model-0000k-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json``, and ``tokenizer.json`` when ``tokenizer`` (a
    ``tokenizers.Tokenizer``) is given. ``dtype`` casts the tensors (default: as stored in
    ``params``). Tied models store the table once, as ``model.embed_tokens.weight``.

    Raises:
      ValueError: a :class:`~jaxq.QArray` leaf (dequantize first), a missing or mis-shaped
        param, params the config does not describe, or a config HF cannot express.
    """
    from safetensors.numpy import save_file

    folder = Path(path)
    config_to_hf(cfg)  # a config HF cannot express fails before any param is read
    weights = hf_weights(cfg)
    tensors: dict[str, np.ndarray] = {}
    seen: set[tuple[str, ...]] = set()
    for w in weights:
        try:
            x = _get(params, w.path)
        except KeyError:
            raise ValueError(f"params have no {'/'.join(w.path)} (needed for {w.hf})") from None
        if is_qarray(x):
            raise ValueError(f"{'/'.join(w.path)} is a QArray; write_hf writes float params "
                             "(use jaxq.dequantize first)")
        x = np.asarray(x)
        if tuple(x.shape) != w.shape:
            raise ValueError(f"{'/'.join(w.path)} has shape {tuple(x.shape)}, expected {w.shape}")
        if dtype is not None:
            x = x.astype(np.dtype(dtype))
        tensors[w.hf] = np.ascontiguousarray(x.T if w.transpose else x)
        seen.add(w.path)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
    known = {"/".join(p) for p in seen}
    extra = [q for q in (path_str(p) for p, _ in leaves) if q not in known]
    if extra:
        raise ValueError(f"params have leaves the {cfg.arch} config does not describe: {extra[:8]}")
    dtypes = {t.dtype for t in tensors.values()}
    torch_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                   np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(dtypes.pop() if len(dtypes) == 1 else None, "float32")
    hf = config_to_hf(cfg, torch_dtype)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    for stale in [folder / WEIGHTS_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata=meta)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, t in tensors.items():
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += t.nbytes
        n = len(shards)
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(folder / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        (folder / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(folder / TOKENIZER_FILE))
    return folder
