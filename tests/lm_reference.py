"""Test helpers: an independent float64 numpy forward pass of HF decoder checkpoints, and tiny
random-init HF checkpoint folders for each family.

Nothing here imports jaxq: the forward pass is written from the HF tensor names and
``config.json`` keys (following transformers' Llama, Qwen2, Qwen3, Gemma2 and Gemma3 modeling
code) and reads the weights with ``safetensors.numpy`` only, so it checks jaxq's loader *and*
model rather than agreeing with them by construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (bf16 numpy dtype for safetensors.numpy)
import numpy as np

VOCAB = 97
HIDDEN = 32
INTER = 64

_BASE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2)

# Family fixtures. Sizes are tiny; RoPE, scaling and soft-cap values are chosen so that each
# feature changes the logits at a 12-token prompt (e.g. a low rope_theta for the llama3 scaling,
# soft-caps that bite on logits of order 1, a sliding window of 4).
FAMILIES: dict[str, dict[str, Any]] = {
    # tied, only lm_head.weight stored (as in TinyStories-656K)
    "llama": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=2,
                  hidden_act="silu", rope_theta=10000.0, tie_word_embeddings=True, _tied_as="lm_head"),
    # untied, Llama-3 rope scaling
    "llama3": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=3,
                   hidden_act="silu", rope_theta=500.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Mistral without sliding window, explicit head_dim != hidden / heads, linear rope scaling
    "mistral": dict(_BASE, model_type="mistral", architectures=["MistralForCausalLM"], num_hidden_layers=2,
                    head_dim=16, hidden_act="silu", rope_theta=1000.0, sliding_window=None,
                    tie_word_embeddings=False, rope_scaling={"type": "linear", "factor": 2.0}),
    # tied (stored as model.embed_tokens.weight), q/k/v biases
    "qwen2": dict(_BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=2,
                  hidden_act="silu", rope_theta=1_000_000.0, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=None),
    # QK-norm, explicit head_dim 16
    "qwen3": dict(_BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=3,
                  head_dim=16, hidden_act="silu", rope_theta=10000.0, tie_word_embeddings=False,
                  attention_bias=False, use_sliding_window=False),
    "gemma2": dict(_BASE, model_type="gemma2", architectures=["Gemma2ForCausalLM"], num_hidden_layers=4,
                   head_dim=16, hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   sliding_window=4, tie_word_embeddings=True, pad_token_id=0),
    # 7 layers: layer 5 is global (pattern 6), the others slide over 4 tokens with the local theta
    "gemma3": dict(_BASE, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], num_hidden_layers=7,
                   head_dim=16, hidden_activation="gelu_pytorch_tanh", rope_theta=1_000_000.0,
                   rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                   query_pre_attn_scalar=16, sliding_window=4, sliding_window_pattern=6,
                   final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
                   pad_token_id=0),
    # multimodal layout: text_config, language_model.model.* names, explicit layer_types, a vision tensor
    "gemma3_mm": dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                      text_config=dict(_BASE, model_type="gemma3_text", num_hidden_layers=7, head_dim=8,
                                       hidden_activation="gelu_pytorch_tanh", rope_theta=1_000_000.0,
                                       rope_local_base_freq=10000.0, query_pre_attn_scalar=8,
                                       sliding_window=4, final_logit_softcapping=None,
                                       attn_logit_softcapping=None,
                                       layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                    "sliding_attention", "sliding_attention",
                                                    "sliding_attention", "full_attention"]),
                      tie_word_embeddings=True, _prefix="language_model.model."),
}


# --- config helpers --------------------------------------------------------------------------
def text_config(hf: dict) -> dict:
    return hf["text_config"] if hf.get("model_type") == "gemma3" and "text_config" in hf else hf


def _family(c: dict) -> str:
    mt = c["model_type"]
    return {"gemma3_text": "gemma3", "mistral": "llama"}.get(mt, mt)


def _head_dim(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _sliding(c: dict, i: int) -> bool:
    fam = _family(c)
    if "layer_types" in c and c["layer_types"] is not None:
        return c["layer_types"][i] == "sliding_attention"
    if fam == "gemma2":
        return i % 2 == 0
    if fam == "gemma3":
        return (i + 1) % c.get("sliding_window_pattern", 6) != 0
    return False


def tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of the text decoder (``model.`` prefix, head included when untied)."""
    c = text_config(hf)
    fam = _family(c)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = _head_dim(c)
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (d,)
        s[p + "self_attn.q_proj.weight"] = (q, d)
        s[p + "self_attn.k_proj.weight"] = (kv, d)
        s[p + "self_attn.v_proj.weight"] = (kv, d)
        s[p + "self_attn.o_proj.weight"] = (d, q)
        if fam == "qwen2":
            s[p + "self_attn.q_proj.bias"] = (q,)
            s[p + "self_attn.k_proj.bias"] = (kv,)
            s[p + "self_attn.v_proj.bias"] = (kv,)
        if fam in ("qwen3", "gemma3"):
            s[p + "self_attn.q_norm.weight"] = (hd,)
            s[p + "self_attn.k_norm.weight"] = (hd,)
        s[p + "post_attention_layernorm.weight"] = (d,)
        if fam.startswith("gemma"):
            s[p + "pre_feedforward_layernorm.weight"] = (d,)
            s[p + "post_feedforward_layernorm.weight"] = (d,)
        s[p + "mlp.gate_proj.weight"] = (f, d)
        s[p + "mlp.up_proj.weight"] = (f, d)
        s[p + "mlp.down_proj.weight"] = (d, f)
    s["model.norm.weight"] = (d,)
    s["lm_head.weight"] = (v, d)
    return s


# --- checkpoint writing ----------------------------------------------------------------------
def make_tokenizer(vocab_size: int = VOCAB):
    """A tiny word-level ``tokenizers.Tokenizer``: ``<unk>``, ``<s>``, ``</s>``, then ``w3``, ``w4``..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def random_tensors(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names (``model.`` prefix, untied head included)."""
    rng = np.random.default_rng(seed)
    gemma = _family(text_config(hf)).startswith("gemma")
    out = {}
    for name, shape in tensor_shapes(hf).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            x = 0.1 * rng.standard_normal(shape) + (0.0 if gemma else 1.0)
        elif name.endswith(".bias"):
            x = 0.1 * rng.standard_normal(shape)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            x = 0.2 * rng.standard_normal(shape)
        else:  # Linear [out, in]: unit-ish activations layer after layer
            x = rng.standard_normal(shape) * (0.7 / math.sqrt(shape[1]))
        out[name] = x.astype(np.float32)
    return out


def make_checkpoint(folder: str | Path, family: str, *, dtype: str = "float32", seed: int = 0,
                    shards: int = 1, tied_as: str | None = None, tensors: dict | None = None) -> Path:
    """Writes a random-init HF folder (config.json, safetensors, tokenizer.json) for ``family``.

    ``dtype`` ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``shards > 1`` writes
    ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``. Tied models store
    the table as ``tied_as`` = ``"embed"`` (``model.embed_tokens.weight``, HF's default),
    ``"lm_head"`` (only ``lm_head.weight``, like TinyStories-656K) or ``"both"``.
    ``tensors`` overrides the random weights (HF ``model.`` names).
    """
    from safetensors.numpy import save_file

    spec = dict(FAMILIES[family])
    prefix = spec.pop("_prefix", "model.")
    tied_as = tied_as or spec.pop("_tied_as", "embed")
    spec.pop("_tied_as", None)
    hf = json.loads(json.dumps(spec))
    hf["torch_dtype"] = dtype
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ts = random_tensors(hf, seed) if tensors is None else dict(tensors)
    tied = text_config(hf).get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    if tied:
        if tied_as == "lm_head":
            ts["lm_head.weight"] = ts.pop("model.embed_tokens.weight")
        elif tied_as == "both":
            ts["lm_head.weight"] = ts["model.embed_tokens.weight"].copy()
        else:
            ts.pop("lm_head.weight", None)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    named = {}
    for k, x in ts.items():
        if k.startswith("model."):
            k = prefix + k[len("model."):]
        elif k == "lm_head.weight" and prefix == "language_model.model.":
            k = "language_model.lm_head.weight"
        named[k] = np.ascontiguousarray(x.astype(np_dtype))
    if family == "gemma3_mm":  # a vision tensor the text loader must skip
        named["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3, 2, 2), np_dtype)
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    for old in folder.glob("*.safetensors"):
        old.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(named, str(folder / "model.safetensors"), metadata=meta)
    else:
        names = list(named)
        weight_map = {}
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: named[n] for n in names[k::shards]}
            save_file(part, str(folder / fname), metadata=meta)
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(x.nbytes for x in named.values())}, "weight_map": weight_map}))
    make_tokenizer(text_config(hf)["vocab_size"]).save(str(folder / "tokenizer.json"))
    return folder


# --- the reference forward pass --------------------------------------------------------------
def load_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of the folder as float64, names normalised to ``model.*`` / ``lm_head.weight``."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for f in files:
        for k, v in load_file(str(folder / f)).items():
            for p in ("language_model.model.", "model.language_model."):
                if k.startswith(p):
                    k = "model." + k[len(p):]
            if k == "language_model.lm_head.weight":
                k = "lm_head.weight"
            out[k] = v.astype(np.float64)
    return out


def _inv_freq(hd: int, theta: float, scaling: dict | None) -> np.ndarray:
    inv = np.array([1.0 / theta ** (2 * j / hd) for j in range(hd // 2)])
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    factor = scaling["factor"]
    if kind == "linear":
        return inv / factor
    assert kind == "llama3", kind
    old = scaling["original_max_position_embeddings"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:  # high frequency: unchanged
            out.append(f)
        elif wavelen > old / lo:  # low frequency: interpolated
            out.append(f / factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def _rope(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """HF rotate-half RoPE on ``x [T, H, hd]`` at positions 0..T-1."""
    t = x.shape[0]
    freqs = np.arange(t)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(folder: str | Path, ids: np.ndarray) -> np.ndarray:
    """float64 logits ``[T, V]`` of the HF checkpoint in ``folder`` for one sequence ``ids [T]``."""
    folder = Path(folder)
    c = text_config(json.loads((folder / "config.json").read_text()))
    w = load_tensors(folder)
    fam = _family(c)
    gemma = fam.startswith("gemma")
    d, n_h, n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd, eps = _head_dim(c), c["rms_norm_eps"]
    t = len(ids)

    def rms(x, g):
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
        return y * (1.0 + g) if gemma else y * g

    embed = w["model.embed_tokens.weight"] if "model.embed_tokens.weight" in w else w["lm_head.weight"]
    head = embed if c.get("tie_word_embeddings", gemma) else w["lm_head.weight"]
    h = embed[np.asarray(ids)]
    if gemma:
        h = h * math.sqrt(d)
    scale = c["query_pre_attn_scalar"] ** -0.5 if gemma else hd ** -0.5
    cap = c.get("attn_logit_softcapping") if fam == "gemma2" else None
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = _sliding(c, i)
        if fam == "gemma3" and sliding:
            inv = _inv_freq(hd, c["rope_local_base_freq"], None)
        else:
            inv = _inv_freq(hd, c["rope_theta"], c.get("rope_scaling"))
        x = rms(h, w[p + "input_layernorm.weight"])
        q = x @ w[p + "self_attn.q_proj.weight"].T
        k = x @ w[p + "self_attn.k_proj.weight"].T
        v = x @ w[p + "self_attn.v_proj.weight"].T
        if fam == "qwen2":
            q = q + w[p + "self_attn.q_proj.bias"]
            k = k + w[p + "self_attn.k_proj.bias"]
            v = v + w[p + "self_attn.v_proj.bias"]
        q, k, v = q.reshape(t, n_h, hd), k.reshape(t, n_kv, hd), v.reshape(t, n_kv, hd)
        if fam in ("qwen3", "gemma3"):
            q = rms(q, w[p + "self_attn.q_norm.weight"])
            k = rms(k, w[p + "self_attn.k_norm.weight"])
        q, k = _rope(q, inv), _rope(k, inv)
        out = np.zeros((t, n_h, hd))
        for hh in range(n_h):
            g = hh // (n_h // n_kv)
            s = q[:, hh] @ k[:, g].T * scale
            if cap is not None:
                s = cap * np.tanh(s / cap)
            qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
            allowed = ki <= qi
            if sliding:
                allowed &= qi - ki < c["sliding_window"]
            s = np.where(allowed, s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            out[:, hh] = pr @ v[:, g]
        a = out.reshape(t, n_h * hd) @ w[p + "self_attn.o_proj.weight"].T
        if gemma:
            a = rms(a, w[p + "post_attention_layernorm.weight"])
            h = h + a
            x = rms(h, w[p + "pre_feedforward_layernorm.weight"])
        else:
            h = h + a
            x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        m = ((_gelu_tanh(gate) if gemma else _silu(gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        if gemma:
            m = rms(m, w[p + "post_feedforward_layernorm.weight"])
        h = h + m
    logits = rms(h, w["model.norm.weight"]) @ head.T
    fcap = c.get("final_logit_softcapping") if gemma else None
    if fcap is not None:
        logits = fcap * np.tanh(logits / fcap)
    return logits
