"""GGUF checkpoints (llama.cpp): read into a :class:`~jaxq.models.decoder.Decoder`, and write back.

Reading::

    cfg, params, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    logits = Decoder(cfg).apply({"params": params}, tokens)

* :func:`config_from_gguf` translates the ``{arch}.*`` metadata into a :class:`DecoderConfig`
  (llama, qwen2, qwen3, gemma2, gemma3). Llama files have llama.cpp's permuted Q/K rows, so
  their config says ``rope_interleaved=True``; Gemma files store RMSNorm weights with the
  ``+1`` already added, so their config says ``norm_plus_one=False``.
* :func:`read_params` maps the tensors onto the Decoder tree. Q8_0, Q4_0 and Q4_1 tensors become
  :class:`~jaxq.QArray` with GGUF's own codes and fp16 scales, no requantization:
  ``dequantize()`` equals ``gguf.quants.dequantize`` bit for bit (Q4_1 uses a value-domain zero
  point, ``(c - qmin) * d + m``). Every other type is dequantized to float on load.
* :func:`load_gguf` does both and rebuilds the tokenizer (:mod:`jaxq.lm.gguf_tokenizer`).

Writing: :func:`save_gguf_params` writes the inverse (metadata, tokenizer, tensors). Float
kernels go as F32/F16/BF16 (as stored), norms as F32, and QArray kernels in the layouts of
the ``"q8_0"``, ``"q4_0"`` and ``"q4_1"`` presets (groups of 32 along the input axis, fp16
scales) as Q8_0/Q4_0/Q4_1 with the same codes and scales; any other layout raises.
Reading a written file gives the same leaves, hence the same logits.

What a GGUF file cannot carry (and a re-read config shows differently): ``norm_plus_one=True``
(written as stored ``1 + w``, read back as ``norm_plus_one=False``); a Llama with
``rope_interleaved=False`` (rows permuted on write, read back interleaved); ``query_scale`` is
the architecture's default unless written as ``{arch}.attention.scale`` (float32); float
metadata is float32 (read back as the shortest decimal that rounds to it); an explicit
all-global ``layer_kinds`` is read back as ``()``; only three EOS ids (eos, eot, eom); the
switches fixed by the architecture (activation, embedding scale, post-norms) must be the
architecture's (checked on write).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.models.decoder_config import ARCHITECTURES, DecoderConfig, RopeScaling
from jaxq.numerics.tiling import Tiling
from jaxq.qarray import QArray, QMeta

SUPPORTED_ARCHITECTURES = ARCHITECTURES
BLOCK = 32  # Q8_0 / Q4_0 / Q4_1 block size
_GEMMA = ("gemma2", "gemma3")
# llama.cpp's Gemma 27B models scale queries by (hidden / heads) ** -0.5, not head_dim ** -0.5
# (their query_pre_attn_scalar); it recognises them by the layer count.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_REQUIRED = object()


class GGUFError(ValueError):
    """A GGUF file (or a tree to be written as one) does not fit what this module supports."""


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("GGUF files need the `gguf` package: pip install gguf") from e
    return gguf


def _reader(path_or_reader):
    if hasattr(path_or_reader, "tensors") and hasattr(path_or_reader, "fields"):
        return path_or_reader
    return _gguf().GGUFReader(os.fspath(path_or_reader))


def _meta(reader, key: str, default: Any = _REQUIRED, why: str = "") -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"GGUF metadata key {key!r} is missing{why}")
        return default
    return field.contents()


def _f32(v: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _one_int(v: Any, key: str) -> int:
    if isinstance(v, (list, tuple)):  # per-layer arrays (some converters write them)
        if len(set(v)) != 1:
            raise GGUFError(f"{key} differs between layers ({sorted(set(v))}); per-layer sizes are not supported")
        v = v[0]
    return int(v)


# --- config ----------------------------------------------------------------------------------
def config_from_gguf(reader) -> DecoderConfig:
    """A :class:`DecoderConfig` from a GGUF file's metadata (a ``gguf.GGUFReader`` or a path).

    Raises:
      GGUFError: an architecture other than :data:`SUPPORTED_ARCHITECTURES`, a missing required
        key (named), or a feature this decoder lacks (partial rotary, YaRN scaling).
    """
    r = _reader(reader)
    arch = _meta(r, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in r.tensors}

    def key(name, default=_REQUIRED):
        k = f"{arch}.{name}"
        return _meta(r, k, default, why=f" (needed for a {arch} model)")

    n_layers = _one_int(key("block_count"), f"{arch}.block_count")
    d = _one_int(key("embedding_length"), f"{arch}.embedding_length")
    f = _one_int(key("feed_forward_length"), f"{arch}.feed_forward_length")
    heads = _one_int(key("attention.head_count"), f"{arch}.attention.head_count")
    kv = _one_int(key("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv")
    hd = int(key("attention.key_length", d // heads))
    vlen = key("attention.value_length", None)
    if vlen is not None and int(vlen) != hd:
        raise GGUFError(f"{arch}.attention.value_length={vlen} differs from key_length={hd}; not supported")
    rope_dim = key("rope.dimension_count", None)
    if rope_dim is not None and int(rope_dim) != hd:
        raise GGUFError(f"{arch}.rope.dimension_count={rope_dim} < head_dim={hd} (partial rotary) is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF tensor 'token_embd.weight' is missing")
    vocab = int(tensors["token_embd.weight"].shape[1])
    theta = _f32(key("rope.freq_base", 10000.0))

    kw: dict[str, Any] = {}
    if arch in _GEMMA:
        kw.update(activation="gelu_tanh", embed_scale=True, post_norms=True, norm_plus_one=False)
        window = int(key("attention.sliding_window"))
        pattern = key("attention.sliding_window_pattern", _SWA_PATTERN[arch])
        kw["sliding_window"] = window
        kw["layer_kinds"] = _layer_kinds(pattern, n_layers)
        if arch == "gemma2":
            kw["attn_softcap"] = _f32(key("attn_logit_softcapping", 50.0))
            kw["final_softcap"] = _f32(key("final_logit_softcapping", 30.0))
        else:
            kw["rope_local_theta"] = _f32(key("rope.freq_base_swa", 10000.0))
            for name, field in (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping")):
                v = key(field, None)
                kw[name] = None if v is None else _f32(v)
        if _GEMMA_27B_LAYERS[arch] == n_layers:
            default_scale = (d // heads) ** -0.5
        else:
            default_scale = hd ** -0.5
        scale = key("attention.scale", None)
        kw["query_scale"] = default_scale if scale is None else _f32(scale)
    else:
        window = key("attention.sliding_window", None)
        pattern = key("attention.sliding_window_pattern", None)
        if window is not None:
            kw["sliding_window"] = int(window)
        if pattern is not None:
            kw["layer_kinds"] = _layer_kinds(pattern, n_layers)
        base_swa = key("rope.freq_base_swa", None)
        if base_swa is not None:
            kw["rope_local_theta"] = _f32(base_swa)
        scale = key("attention.scale", None)
        kw["query_scale"] = None if scale is None else _f32(scale)
        for name, field in (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping")):
            v = key(field, None)
            if v is not None:
                kw[name] = _f32(v)

    eos = [_meta(r, f"tokenizer.ggml.{k}", None) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos_ids: list[int] = []
    for e in eos:
        if e is not None and int(e) not in eos_ids:
            eos_ids.append(int(e))
    bos = _meta(r, "tokenizer.ggml.bos_token_id", None)
    pad = _meta(r, "tokenizer.ggml.padding_token_id", None)
    tok_model = _meta(r, "tokenizer.ggml.model", None)
    add_bos = bool(_meta(r, "tokenizer.ggml.add_bos_token", tok_model == "llama"))
    return DecoderConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=_rope_scaling(r, arch, tensors, theta, hd),
        rope_interleaved=arch == "llama",
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
        pad_token_id=None if pad is None else int(pad),
        add_bos=add_bos and bos is not None,
        **kw,
    )


def _layer_kinds(pattern: Any, n_layers: int) -> tuple[str, ...]:
    """llama.cpp's sliding-window pattern: an int ``p`` (layer ``i`` slides when ``i % p < p - 1``)
    or one bool per layer (True = sliding)."""
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layers:
            raise GGUFError(f"sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return tuple("sliding" if bool(p) else "global" for p in pattern)
    p = int(pattern)
    return tuple("sliding" if p > 0 and i % p < p - 1 else "global" for i in range(n_layers))


def _llama3_factors(theta: float, hd: int, s: RopeScaling) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for Llama-3 scaling (as its converter computes it)."""
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for fr in freqs.astype(np.float64):
        wl = 2 * math.pi / fr
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(out, np.float32)


def _rope_scaling(r, arch: str, tensors, theta: float, hd: int) -> RopeScaling | None:
    kind = _meta(r, f"{arch}.rope.scaling.type", None)
    factor = _meta(r, f"{arch}.rope.scaling.factor", None)
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: per-frequency divisors instead of a rule name
        rf = np.asarray(tensors["rope_freqs.weight"].data, np.float64).reshape(-1)
        if rf.size != hd // 2:
            raise GGUFError(f"rope_freqs.weight has {rf.size} entries; head_dim {hd} needs {hd // 2}")
        factor = _f32(rf.max())
        orig = int(_meta(r, f"{arch}.rope.scaling.original_context_length", 8192))
        low, high = 1.0, 4.0
        mid = (rf > 1 + 1e-6) & (rf < factor - 1e-6)
        if mid.sum() >= 2 and factor > 1:
            freqs = 1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
            x = orig * freqs.astype(np.float64)[mid] / (2 * math.pi)
            smooth = (1 / rf[mid] - 1 / factor) / (1 - 1 / factor)
            a, b = np.polyfit(x, smooth, 1)
            low, high = round(-b / a, 3), round(-b / a + 1 / a, 3)
        s = RopeScaling("llama3", factor, low, high, orig)
        if not np.allclose(_llama3_factors(theta, hd, s), rf, rtol=1e-4, atol=1e-6):
            raise GGUFError("rope_freqs.weight does not follow Llama 3's scaling rule; this decoder cannot run it")
        return s
    if kind in (None, "none"):
        legacy = _meta(r, f"{arch}.rope.scale_linear", None)
        return None if legacy is None or float(legacy) == 1.0 else RopeScaling("linear", _f32(legacy))
    if kind == "linear":
        if factor is None:
            raise GGUFError(f"GGUF metadata key '{arch}.rope.scaling.factor' is missing (linear RoPE scaling)")
        return None if float(factor) == 1.0 else RopeScaling("linear", _f32(factor))
    raise GGUFError(f"RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported; supported: linear, llama3")


# --- the tensor layout -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Slot:
    gguf: str  # GGUF tensor name
    path: tuple[str, ...]  # Decoder tree path
    kind: str  # "kernel" ([in, out], GGUF rows = out), "embed" ([V, D], rows = V), "vector"
    shape: tuple[int, ...]  # Flax shape

    @property
    def ne(self) -> tuple[int, ...]:
        """GGUF's dims (innermost first): the Flax shape of a kernel, reversed for an embedding."""
        return self.shape if self.kind == "kernel" else tuple(reversed(self.shape))

    @property
    def where(self) -> str:
        return "/".join(self.path)


def _layout(cfg: DecoderConfig) -> Iterator[_Slot]:
    d, f, hd, v = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    if cfg.tie_word_embeddings:
        yield _Slot("token_embd.weight", ("lm_head", "kernel"), "kernel", (d, v))
    else:
        yield _Slot("token_embd.weight", ("embed_tokens", "embedding"), "embed", (v, d))
    for i in range(cfg.num_layers):
        b, L = f"blk.{i}.", f"layers_{i}"
        yield _Slot(b + "attn_norm.weight", (L, "attn_norm", "scale"), "vector", (d,))
        for name, proj, n in (("attn_q", "q_proj", q), ("attn_k", "k_proj", kv), ("attn_v", "v_proj", kv)):
            yield _Slot(f"{b}{name}.weight", (L, "attn", proj, "kernel"), "kernel", (d, n))
            if cfg.qkv_bias:
                yield _Slot(f"{b}{name}.bias", (L, "attn", proj, "bias"), "vector", (n,))
        yield _Slot(b + "attn_output.weight", (L, "attn", "o_proj", "kernel"), "kernel", (q, d))
        if cfg.qk_norm:
            yield _Slot(b + "attn_q_norm.weight", (L, "attn", "q_norm", "scale"), "vector", (hd,))
            yield _Slot(b + "attn_k_norm.weight", (L, "attn", "k_norm", "scale"), "vector", (hd,))
        if cfg.post_norms:
            yield _Slot(b + "post_attention_norm.weight", (L, "post_attn_norm", "scale"), "vector", (d,))
        yield _Slot(b + "ffn_norm.weight", (L, "mlp_norm", "scale"), "vector", (d,))
        yield _Slot(b + "ffn_gate.weight", (L, "mlp", "gate_proj", "kernel"), "kernel", (d, f))
        yield _Slot(b + "ffn_up.weight", (L, "mlp", "up_proj", "kernel"), "kernel", (d, f))
        yield _Slot(b + "ffn_down.weight", (L, "mlp", "down_proj", "kernel"), "kernel", (f, d))
        if cfg.post_norms:
            yield _Slot(b + "post_ffw_norm.weight", (L, "post_mlp_norm", "scale"), "vector", (d,))
    yield _Slot("output_norm.weight", ("norm", "scale"), "vector", (d,))
    if not cfg.tie_word_embeddings:
        yield _Slot("output.weight", ("lm_head", "kernel"), "kernel", (d, v))


def _is_norm(slot: _Slot) -> bool:
    return slot.path[-1] == "scale"


# --- reading tensors -------------------------------------------------------------------------
def _native_types():
    Q = _gguf().GGMLQuantizationType
    return {Q.Q8_0: ("int8", True), Q.Q4_0: ("int4", True), Q.Q4_1: ("int4", False)}


def _blocks(t) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Q8_0/Q4_0/Q4_1 tensor's int8 codes ``[rows, ne0]``, fp16 scales ``[rows, ne0/32]`` (and mins)."""
    Q = _gguf().GGMLQuantizationType
    data = np.asarray(t.data)
    rows = data.shape[0] if data.ndim > 1 else 1
    head = {Q.Q8_0: 2, Q.Q4_0: 2, Q.Q4_1: 4}[t.tensor_type]
    width = head + (BLOCK if t.tensor_type == Q.Q8_0 else BLOCK // 2)
    b = data.reshape(rows, -1, width)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0] if t.tensor_type == Q.Q4_1 else None
    qs = b[..., head:]
    if t.tensor_type == Q.Q8_0:
        codes = qs.view(np.int8)
    else:  # byte j: element j (low nibble) and j + 16 (high nibble); q in 0..15, codes q - 8
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)
        codes = q - np.int8(8)
    return codes.reshape(rows, -1), d, m


def _pack_int4(codes: np.ndarray, axis: int) -> np.ndarray:
    """jaxq's int4 packing (element 2i low nibble, 2i+1 high) along ``axis``, in numpy."""
    c = np.moveaxis(codes, axis, 0)
    lo = c[0::2].astype(np.uint8) & 0x0F
    hi = (c[1::2].astype(np.uint8) & 0x0F) << 4
    return np.ascontiguousarray(np.moveaxis((lo | hi).view(np.int8), 0, axis))


def _native_qarray(t, slot: _Slot, dtype) -> QArray:
    fmt, symmetric = _native_types()[t.tensor_type]
    codes, d, m = _blocks(t)  # GGUF layout [rows, ne0]; blocks along ne0
    if slot.kind == "kernel":  # Flax [in, out]: groups along the input axis (-2)
        codes, d, m = codes.T, d.T, None if m is None else m.T
        chan, gax = -1, -2
    else:  # embedding [V, D]: groups along D (-1), one scale row per token
        chan, gax = -2, -1
    tiling = Tiling.make(codes.shape, (chan,), gax, BLOCK)
    pack_axis = gax if fmt == "int4" else None
    values = _pack_int4(codes, gax) if pack_axis is not None else np.ascontiguousarray(codes)
    meta = QMeta(fmt, np.dtype(dtype or np.float32), tiling, symmetric, pack_axis, None,
                 "code" if symmetric else "value")
    zp = None if m is None else jnp.asarray(np.ascontiguousarray(m))
    return QArray(jnp.asarray(values), jnp.asarray(np.ascontiguousarray(d)), zp, meta)


def _float_array(t, slot: _Slot) -> np.ndarray:
    """A non-native tensor as float in GGUF's numpy layout ``[rows, ne0]`` (F16/BF16 kept as such)."""
    gg = _gguf()
    Q = gg.GGMLQuantizationType
    if t.tensor_type == Q.F32:
        return np.asarray(t.data, np.float32)
    if t.tensor_type == Q.F16:
        return np.asarray(t.data, np.float16)
    if t.tensor_type == Q.BF16:
        import ml_dtypes

        return np.ascontiguousarray(t.data).view(ml_dtypes.bfloat16)
    try:
        return np.asarray(gg.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError:
        raise GGUFError(
            f"tensor {t.name!r} has GGUF type {t.tensor_type.name}, which the gguf package cannot dequantize"
        ) from None


def _nested(path: tuple[str, ...], leaf: Any) -> dict:
    out: Any = leaf
    for k in reversed(path):
        out = {k: out}
    return out


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], leaf: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = leaf


def read_params(path_or_reader, cfg: DecoderConfig, *, dtype: Any = None, quantize: Any = None) -> dict:
    """The Decoder parameter tree (``Decoder(cfg).apply({'params': tree}, ...)``) of a GGUF file.

    Args:
      path_or_reader: a path or a ``gguf.GGUFReader``.
      cfg: the config (usually :func:`config_from_gguf` of the same file).
      dtype: cast float leaves (and the logical dtype of QArrays) to this, e.g. ``jnp.bfloat16``.
      quantize: a jaxq policy or preset name; float tensors (not Q8_0/Q4_0/Q4_1, which stay as
        they are) are quantized one by one as they are read, with their tree path
        (``layers_3/attn/q_proj/kernel``) for the policy's rules.

    Raises:
      GGUFError: a missing tensor, a shape that does not fit ``cfg`` (both named), or a
        tensor type the gguf package cannot dequantize.
    """
    from jaxq.policy import as_policy
    from jaxq.quantize import quantize as quantize_tree

    r = _reader(path_or_reader)
    tensors = {t.name: t for t in r.tensors}
    policy = None if quantize is None else as_policy(quantize)
    native = _native_types()
    params: dict = {}
    for slot in _layout(cfg):
        t = tensors.get(slot.gguf)
        if t is None:
            raise GGUFError(f"GGUF tensor {slot.gguf!r} is missing (needed for {slot.where})")
        found = tuple(int(n) for n in t.shape)
        if found != slot.ne:
            raise GGUFError(
                f"GGUF tensor {slot.gguf!r} has shape {found} (GGUF order); the config needs {slot.ne} "
                f"for {slot.where} {slot.shape}"
            )
        if t.tensor_type in native and len(slot.shape) == 2 and slot.ne[0] % BLOCK == 0:
            leaf: Any = _native_qarray(t, slot, dtype)
        else:
            arr = _float_array(t, slot).reshape(tuple(reversed(slot.ne)))
            arr = arr.T if slot.kind == "kernel" else arr
            leaf = jnp.asarray(np.ascontiguousarray(arr))
            if policy is not None:
                leaf = _get(quantize_tree(_nested(slot.path, leaf), policy), slot.path)
            if isinstance(leaf, QArray):
                if dtype is not None:
                    leaf = QArray(leaf.values, leaf.scale, leaf.zero_point,
                                  dataclasses.replace(leaf.meta, dtype=np.dtype(dtype)))
            elif dtype is not None:
                leaf = leaf.astype(dtype)
        _set(params, slot.path, leaf)
    return params


def load_gguf(path, *, dtype: Any = None, quantize: Any = None):
    """``(DecoderConfig, params, tokenizers.Tokenizer)`` from a GGUF file (tokenizer None if it has none).

    See :func:`config_from_gguf`, :func:`read_params` and
    :func:`jaxq.lm.gguf_tokenizer.tokenizer_from_gguf`.
    """
    from jaxq.lm.gguf_tokenizer import tokenizer_from_gguf

    r = _reader(path)
    cfg = config_from_gguf(r)
    params = read_params(r, cfg, dtype=dtype, quantize=quantize)
    tok = tokenizer_from_gguf(r) if "tokenizer.ggml.model" in r.fields else None
    return cfg, params, tok


# --- writing ---------------------------------------------------------------------------------
_FITTING = ("quantize with the 'q8_0' / 'q4_0' / 'q4_1' presets (int8 or int4 per_group group_size=32 "
            "along the input axis, scale_dtype='float16'; int4 symmetric full range, or asymmetric with "
            "zero_point_domain='value'), or dequantize it")


def _rope_perm(n_heads: int, hd: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation: within each head, new row 2i = old i, 2i+1 = old i + hd/2."""
    half = np.arange(hd // 2)
    one = np.stack([half, half + hd // 2], axis=1).reshape(-1)
    return (np.arange(n_heads)[:, None] * hd + one[None, :]).reshape(-1)


def _take_cols(x: Any, perm: np.ndarray) -> Any:
    """Permutes the last axis of an array or a QArray (kernels: the output axis)."""
    if isinstance(x, QArray):
        if x.meta.pack_axis == -1 or x.meta.tiling.group_axis == -1:
            raise GGUFError("cannot permute a QArray grouped or packed along its output axis")
        take = lambda a: None if a is None else jnp.take(jnp.asarray(a), perm, axis=-1)  # noqa: E731
        return QArray(take(x.values), take(x.scale), take(x.zero_point), x.meta)
    return jnp.take(jnp.asarray(x), perm, axis=-1)


def _fp16_exact(a: np.ndarray) -> bool:
    a = np.asarray(a)
    if a.dtype == np.float16:
        return True
    h = a.astype(np.float16)
    return bool(np.all(np.isfinite(h)) and np.array_equal(h.astype(a.dtype), a))


def _layout_str(q: QArray) -> str:
    t, m = q.meta.tiling, q.meta
    gran = f"groups of {t.group_size} along axis {t.group_axis}" if t.group_size else f"channel axes {t.channel_axes}"
    zp = "symmetric" if q.zero_point is None else f"asymmetric ({m.zero_point_domain}-domain zero point)"
    sd = "none" if q.scale is None else np.dtype(q.scale.dtype).name
    return f"{m.format} {zp}, {gran}, {sd} scales"


def _qarray_bytes(q: QArray, slot: _Slot):
    """(uint8 blocks ``[rows, bytes]``, GGML type) for a QArray in a GGUF-native layout, else GGUFError."""
    Q = _gguf().GGMLQuantizationType
    m, t = q.meta, q.meta.tiling
    gax, chan = (-2, (-1,)) if slot.kind == "kernel" else (-1, (-2,))
    problem = None
    if m.format not in ("int8", "int4"):
        problem = f"format {m.format!r} has no GGUF block type"
    elif t.group_size != BLOCK or t.group_axis != gax or tuple(t.channel_axes) != chan:
        problem = f"GGUF blocks are {BLOCK} consecutive weights along the input axis ({gax}) with per-output scales"
    elif q.zero_point is not None and (m.format != "int4" or m.zero_point_domain != "value"):
        problem = "GGUF's only asymmetric block type, Q4_1, is int4 with a value-domain zero point"
    elif not _fp16_exact(np.asarray(q.scale)) or (q.zero_point is not None and not _fp16_exact(np.asarray(q.zero_point))):
        problem = "its scales (or zero points) are not exactly representable in float16"
    if problem is not None:
        raise GGUFError(f"{slot.where} ({slot.gguf}): a QArray with {_layout_str(q)} does not fit GGUF: {problem}; "
                        + _FITTING)
    codes = np.asarray(q.codes)
    d = np.asarray(q.scale).astype(np.float16)
    zp = None if q.zero_point is None else np.asarray(q.zero_point).astype(np.float16)
    if slot.kind == "kernel":  # to GGUF rows: [out, in]
        codes, d, zp = codes.T, d.T, None if zp is None else zp.T
    rows, n = codes.shape
    nb = n // BLOCK
    c = codes.reshape(rows, nb, BLOCK)
    dh = np.ascontiguousarray(d.reshape(rows, nb, 1)).view(np.uint8)
    if m.format == "int8":
        blocks, qtype = np.concatenate([dh, c.astype(np.int8).view(np.uint8)], axis=-1), Q.Q8_0
    else:
        qv = (c.astype(np.int16) + 8).astype(np.uint8)  # q = c - qmin in 0..15
        qs = qv[..., :16] | (qv[..., 16:] << 4)
        if zp is None:
            blocks, qtype = np.concatenate([dh, qs], axis=-1), Q.Q4_0
        else:
            mh = np.ascontiguousarray(zp.reshape(rows, nb, 1)).view(np.uint8)
            blocks, qtype = np.concatenate([dh, mh, qs], axis=-1), Q.Q4_1
    return np.ascontiguousarray(blocks.reshape(rows, -1)), qtype


def _check_writable(cfg: DecoderConfig) -> None:
    gemma = cfg.arch in _GEMMA
    want = {"activation": "gelu_tanh" if gemma else "silu", "embed_scale": gemma, "post_norms": gemma}
    for name, v in want.items():
        if getattr(cfg, name) != v:
            raise GGUFError(
                f"GGUF {cfg.arch} models have {name}={v!r}; this config has {getattr(cfg, name)!r}, "
                "which a GGUF reader would not know"
            )
    if cfg.arch == "gemma2" and (cfg.attn_softcap is None or cfg.final_softcap is None):
        raise GGUFError("GGUF gemma2 models have attention and final logit soft-capping; this config lacks one")
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3" and cfg.arch != "llama":
        raise GGUFError(f"Llama-3 RoPE scaling is carried by llama GGUF files only, not {cfg.arch}")


def _write_config(w, cfg: DecoderConfig) -> None:
    arch = cfg.arch
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    s = cfg.rope_scaling
    if s is not None and s.kind == "linear":
        w.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s.factor)
    elif s is not None:  # llama3: rope_freqs.weight (written with the tensors) + the original context
        w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
    if cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
    kinds = cfg.layer_kinds or ("global",) * cfg.num_layers
    default = _layer_kinds(_SWA_PATTERN[arch], cfg.num_layers) if arch in _GEMMA else ("global",) * cfg.num_layers
    if kinds != default:
        w.add_sliding_window_pattern([k == "sliding" for k in kinds])
    local_default = 10000.0 if arch == "gemma3" else None
    if cfg.rope_local_theta is not None and cfg.rope_local_theta != local_default:
        w.add_rope_freq_base_swa(cfg.rope_local_theta)
    elif arch == "gemma3" and cfg.rope_local_theta is None:
        w.add_rope_freq_base_swa(cfg.rope_theta)  # no separate local base: the same as the global one
    if cfg.attn_softcap is not None:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap is not None:
        w.add_final_logit_softcapping(cfg.final_softcap)
    if arch in _GEMMA:
        default_scale = ((cfg.hidden_size // cfg.num_heads) if _GEMMA_27B_LAYERS[arch] == cfg.num_layers
                         else cfg.head_dim) ** -0.5
        if cfg.scale_queries != default_scale:
            w.add_attention_scale(cfg.scale_queries)
    elif cfg.query_scale is not None:
        w.add_attention_scale(cfg.query_scale)


def _write_token_ids(w, cfg: DecoderConfig) -> None:
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    for add, eid in zip((w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id), cfg.eos_token_ids):
        add(eid)
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(cfg.add_bos)


def save_gguf_params(path, cfg: DecoderConfig, params: Mapping, tokenizer: Any = None, *, name: str | None = None) -> None:
    """Writes a Decoder (config, params, tokenizer) as a GGUF file that llama.cpp and :func:`load_gguf` read.

    Args:
      path: the file to write.
      cfg: the model's config (see the module docstring for what GGUF cannot carry).
      params: the Decoder tree (or ``{"params": tree}``): float leaves, and QArray kernels in the
        ``"q8_0"`` / ``"q4_0"`` / ``"q4_1"`` layouts (bf16/fp16 cast QArrays are written as BF16/F16).
      tokenizer: a :class:`tokenizers.Tokenizer` (see :func:`jaxq.lm.gguf_tokenizer.tokenizer_to_gguf`),
        or None to write only the special ids of ``cfg``.
      name: ``general.name``.

    Raises:
      GGUFError: a leaf is missing, has the wrong shape, or is a QArray whose layout has no
        GGUF type (the message names the leaf, its layout and the layouts that fit).
    """
    gg = _gguf()
    Q = gg.GGMLQuantizationType
    if set(params) == {"params"}:
        params = params["params"]
    _check_writable(cfg)
    slots = list(_layout(cfg))
    expected = {s.path for s in slots}
    have = {tuple(str(getattr(k, "key", k)) for k in kp)
            for kp, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]}
    extra = sorted("/".join(p) for p in have - expected)
    if extra:
        raise GGUFError(f"params has leaves the config does not describe: {extra[:8]}")

    permute = cfg.arch == "llama" and not cfg.rope_interleaved
    unpermute = cfg.arch != "llama" and cfg.rope_interleaved
    perms = {}
    if permute or unpermute:
        for proj, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            p = _rope_perm(n, cfg.head_dim)
            perms[proj] = p if permute else np.argsort(p)
            p1 = _rope_perm(1, cfg.head_dim)
            perms[proj + "_norm"] = p1 if permute else np.argsort(p1)

    w = gg.GGUFWriter(os.fspath(path), cfg.arch)
    if name:
        w.add_name(name)
    _write_config(w, cfg)
    if tokenizer is not None:
        from jaxq.lm.gguf_tokenizer import tokenizer_to_gguf

        tokenizer_to_gguf(w, tokenizer, cfg)
    else:
        _write_token_ids(w, cfg)

    counts: dict[Any, int] = {}
    for slot in slots:
        try:
            leaf = _get(params, slot.path)
        except (KeyError, TypeError):
            raise GGUFError(f"params has no leaf {slot.where} (the config needs it for {slot.gguf})") from None
        shape = tuple(leaf.shape)
        if shape != slot.shape:
            raise GGUFError(f"{slot.where} has shape {shape}; the config needs {slot.shape} ({slot.gguf})")
        leaf_name = slot.path[-2] if len(slot.path) > 1 else ""
        if perms and slot.path[1:2] == ("attn",) and leaf_name in ("q_proj", "k_proj", "q_norm", "k_norm"):
            leaf = _take_cols(leaf, perms[leaf_name.replace("_proj", "")])
        if isinstance(leaf, QArray) and leaf.meta.fmt.kind != "cast":
            if _is_norm(slot) or len(slot.shape) != 2:
                raise GGUFError(f"{slot.where} ({slot.gguf}) is a QArray; GGUF keeps 1-D tensors in float32")
            data, qtype = _qarray_bytes(leaf, slot)
            w.add_tensor(slot.gguf, data, raw_dtype=qtype)
            counts[qtype] = counts.get(qtype, 0) + leaf.size
            continue
        arr = np.asarray(leaf.values if isinstance(leaf, QArray) else leaf)
        if _is_norm(slot) or slot.kind == "vector":
            arr = arr.astype(np.float32)
            if _is_norm(slot) and cfg.norm_plus_one:
                arr = (np.float32(1.0) + arr).astype(np.float32)
        if slot.kind == "kernel":
            arr = arr.T
        arr = np.ascontiguousarray(arr)
        if arr.dtype == np.float32:
            w.add_tensor(slot.gguf, arr)
            qtype = Q.F32
        elif arr.dtype == np.float16:
            w.add_tensor(slot.gguf, arr)
            qtype = Q.F16
        elif arr.dtype.name == "bfloat16":
            w.add_tensor(slot.gguf, arr.view(np.uint8), raw_dtype=Q.BF16)
            qtype = Q.BF16
        else:
            raise GGUFError(f"{slot.where} ({slot.gguf}) is {arr.dtype.name}; write float32, float16 or bfloat16")
        if len(slot.shape) == 2:
            counts[qtype] = counts.get(qtype, 0) + arr.size
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling))
    main = max(counts, key=counts.get) if counts else Q.F32
    ftype = {Q.F32: "ALL_F32", Q.F16: "MOSTLY_F16", Q.BF16: "MOSTLY_BF16", Q.Q8_0: "MOSTLY_Q8_0",
             Q.Q4_0: "MOSTLY_Q4_0", Q.Q4_1: "MOSTLY_Q4_1"}[main]
    w.add_file_type(int(gg.LlamaFileType[ftype]))
    if any(q in counts for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1)):
        w.add_quantization_version(gg.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
