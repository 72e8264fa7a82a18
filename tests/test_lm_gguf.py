"""GGUF import/export (jaxq.lm.gguf, jaxq.lm.gguf_tokenizer) and the value-domain zero point.

References are independent of the code under test: ``gguf.quants`` (the gguf package's own
numpy (de)quantizers) for tensors, block bytes parsed here by hand for codes and scales, and a
pure-Python byte-level BPE (below) for the SmolLM2 tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import unicodedata

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxq  # noqa: E402
from jaxq.lm import gguf as G  # noqa: E402
from jaxq.lm import gguf_tokenizer as GT  # noqa: E402
from jaxq.models.decoder import Decoder  # noqa: E402
from jaxq.models.decoder_config import DecoderConfig, RopeScaling  # noqa: E402
from jaxq.policy import PRESETS, Policy, Rule  # noqa: E402

Q = gguf.GGMLQuantizationType
DATA = os.environ.get("JAXQ_DATA_DIR")
SMOL = os.path.join(DATA, "smollm2_135m", "SmolLM2-135M-Instruct.Q4_1.gguf") if DATA else None
TINY_TOK = os.path.join(DATA, "tinystories_656k", "tokenizer.json") if DATA else None
needs_smol = pytest.mark.skipif(not (SMOL and os.path.exists(SMOL)),
                                reason="JAXQ_DATA_DIR unset or smollm2_135m GGUF absent")
needs_tiny = pytest.mark.skipif(not (TINY_TOK and os.path.exists(TINY_TOK)),
                                reason="JAXQ_DATA_DIR unset or tinystories_656k tokenizer absent")

Q8_0 = PRESETS["q8_0"].rules[0].weight
Q4_0 = PRESETS["q4_0"].rules[0].weight
Q4_1 = PRESETS["q4_1"].rules[0].weight


# --- independent references ------------------------------------------------------------------
def parse_blocks(data: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GGUF block bytes -> (q as stored: int8 for Q8_0, 0..15 for Q4_x) [rows, n], d, m (float16)."""
    rows = data.shape[0]
    width = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    b = np.asarray(data).reshape(rows, -1, width)
    d = b[..., 0:2].copy().view("<f2")[..., 0]
    if qtype == Q.Q8_0:
        return b[..., 2:].copy().view(np.int8).reshape(rows, -1), d, None
    off = 4 if qtype == Q.Q4_1 else 2
    m = b[..., 2:4].copy().view("<f2")[..., 0] if qtype == Q.Q4_1 else None
    qs = b[..., off:]
    q = np.zeros((rows, b.shape[1], 32), np.int32)
    for j in range(16):
        q[..., j] = qs[..., j] & 15
        q[..., j + 16] = qs[..., j] >> 4
    return q.reshape(rows, -1), d, m


def reference_tensor(t) -> np.ndarray:
    """``gguf.quants.dequantize`` of a reader tensor, as numpy [rows, ne0]."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
        tuple(reversed([int(n) for n in t.shape])))


def tiny_cfg(arch: str, **kw) -> DecoderConfig:
    base = dict(arch=arch, vocab_size=288, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=128,
                bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    gemma = dict(activation="gelu_tanh", embed_scale=True, post_norms=True, tie_word_embeddings=True,
                 query_scale=16 ** -0.5, sliding_window=4)
    per = {
        "llama": dict(rope_interleaved=True, head_dim=32, rope_theta=10000.0,
                      rope_scaling=RopeScaling("llama3", 8.0, 2.0, 8.0, 512)),
        "qwen2": dict(qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0),
        "qwen3": dict(qk_norm=True, head_dim=32, rope_theta=1000000.0),
        "gemma2": dict(gemma, attn_softcap=50.0, final_softcap=30.0, layer_kinds=("sliding", "global"),
                       add_bos=True),
        "gemma3": dict(gemma, qk_norm=True, rope_theta=1000000.0, rope_local_theta=10000.0,
                       layer_kinds=("sliding", "global"), rope_scaling=RopeScaling("linear", 8.0),
                       add_bos=True, eos_token_ids=(2, 3)),
    }[arch]
    base.update(per)
    base.update(kw)
    return DecoderConfig(**base)


_INIT_CACHE: dict = {}


def init_params(cfg: DecoderConfig, seed: int = 0) -> dict:
    """Random Decoder params (cached per config; every call gets fresh containers)."""
    if (cfg, seed) not in _INIT_CACHE:
        _INIT_CACHE[(cfg, seed)] = _init_params(cfg, seed)
    return jax.tree_util.tree_map(lambda x: x, _INIT_CACHE[(cfg, seed)])


def _init_params(cfg: DecoderConfig, seed: int) -> dict:
    params = jax.jit(Decoder(cfg).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:  # non-trivial norms and biases
            x = x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
        else:  # kernels: a wide spread so that layouts and zero points matter
            x = 2.0 * jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[0])
        out.append(x)
    return jax.tree_util.tree_unflatten(tree, out)


MIXED = Policy((
    Rule(r"q_proj/kernel|k_proj/kernel", weight=Q4_0),
    Rule(r"v_proj/kernel|o_proj/kernel", weight=Q8_0),
    Rule(r"gate_proj|up_proj", weight=Q4_1),
    Rule(r"lm_head/kernel", weight=Q8_0),
))  # down_proj and embed_tokens stay float


def byte_tokenizer(extra_merges=("a b", "ab c", "Ġ t", "h e"), specials=("<|pad|>", "<bos>", "<eos>")):
    """A small byte-level BPE: specials, the 256 byte symbols and a few merges."""
    b2u = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(specials)}
    for byte in range(256):
        vocab[b2u[byte]] = len(vocab)
    for m in extra_merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in extra_merges]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def quant(params, policy):
    """``jaxq.quantize`` under jit (one compilation instead of one per eager op)."""
    return jax.jit(lambda p: jaxq.quantize(p, policy))(params)


def logits(cfg: DecoderConfig, params, ids) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, x: Decoder(cfg).apply({"params": p}, x))(params, ids))


def leaves_identical(a, b) -> None:
    fa, ta = jax.tree_util.tree_flatten_with_path(a, is_leaf=jaxq.is_qarray)
    fb, tb = jax.tree_util.tree_flatten_with_path(b, is_leaf=jaxq.is_qarray)
    assert ta == tb, (ta, tb)
    for (path, x), (_, y) in zip(fa, fb):
        where = jax.tree_util.keystr(path)
        assert type(x) is type(y), where
        if isinstance(x, jaxq.QArray):
            assert x.meta == y.meta, (where, x.meta, y.meta)
            for part in ("values", "scale", "zero_point"):
                u, v = getattr(x, part), getattr(y, part)
                assert (u is None) == (v is None), (where, part)
                if u is not None:
                    assert np.asarray(u).dtype == np.asarray(v).dtype, (where, part)
                    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{where}/{part}")
        else:
            assert np.asarray(x).dtype == np.asarray(y).dtype, where
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=where)


# --- the value-domain zero point (numerics) ----------------------------------------------------
def test_value_domain_quantize_and_dequantize_match_numpy():
    x = np.random.default_rng(0).normal(size=(128, 24)).astype(np.float32) + 0.7
    x[:32, 3] = 1.25  # a constant group: zero range
    q = jaxq.quantize_array(jnp.asarray(x), Q4_1)
    assert q.meta.zero_point_domain == "value" and not q.meta.symmetric
    assert q.scale.dtype == jnp.float16 and q.zero_point.dtype == jnp.float16
    codes = np.asarray(q.codes).astype(np.float32)
    assert codes.min() >= -8 and codes.max() <= 7
    s = np.repeat(np.asarray(q.scale, np.float32), 32, axis=0)
    m = np.repeat(np.asarray(q.zero_point, np.float32), 32, axis=0)
    want = (codes + 8) * s + m  # GGUF Q4_1: d * q + m, q = c - qmin
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want)
    # the zero point is the group minimum (in fp16), the scale (max - min) / 15
    g = x.reshape(4, 32, 24)
    np.testing.assert_allclose(np.asarray(q.zero_point, np.float32), g.min(1), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(q.scale, np.float32), np.where(g.max(1) > g.min(1),
                               (g.max(1) - g.min(1)) / 15, 1.0), rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(q.dequantize())[:32, 3], np.float32(np.float16(1.25)))
    err = np.abs(np.asarray(q.dequantize()) - x).max()
    assert err < 0.2
    # the code-domain equivalent reproduces it up to rounding
    zc = np.repeat(np.asarray(q.code_zero_point()), 32, axis=0)
    np.testing.assert_allclose((codes - zc) * s, want, rtol=1e-5, atol=1e-5)


def test_value_domain_spec_validation():
    with pytest.raises(ValueError, match="asymmetric int"):
        jaxq.QuantSpec("int4", symmetric=True, zero_point_domain="value")
    with pytest.raises(ValueError, match="asymmetric int"):
        jaxq.QuantSpec("nf4", zero_point_domain="value")
    with pytest.raises(ValueError, match="zero_point_domain"):
        jaxq.QuantSpec("int4", symmetric=False, zero_point_domain="codes")


@pytest.mark.parametrize("m", [1, 8, 300])
@pytest.mark.parametrize("fmt_spec", ["q4_1", "int8_value"])
def test_value_domain_qmatmul_paths(m, fmt_spec):
    rng = np.random.default_rng(m)
    w = rng.normal(size=(256, 96)).astype(np.float32) - 0.3
    x = rng.normal(size=(m, 256)).astype(np.float32)
    spec = Q4_1 if fmt_spec == "q4_1" else jaxq.QuantSpec("int8", granularity="per_group", group_size=32,
                                                           symmetric=False, zero_point_domain="value")
    q = jaxq.quantize_array(jnp.asarray(w), spec)
    want = x @ np.asarray(q.dequantize())
    got = np.asarray(jaxq.ops.qmatmul(jnp.asarray(x), q))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)
    # per-channel value-domain weights take the factored path
    qc = jaxq.quantize_array(jnp.asarray(w), jaxq.QuantSpec("int8", symmetric=False, zero_point_domain="value"))
    np.testing.assert_allclose(np.asarray(jaxq.ops.qmatmul(jnp.asarray(x), qc)), x @ np.asarray(qc.dequantize()),
                               rtol=2e-4, atol=2e-3)
    # W8A8: activations on the int8 grid, the value-domain epilogue
    a8 = jaxq.QuantSpec("int8", granularity="per_token")
    xq = np.asarray(jaxq.fake_quant(jnp.asarray(x), a8))
    np.testing.assert_allclose(np.asarray(jaxq.ops.qmatmul(jnp.asarray(x), q, act_spec=a8)),
                               xq @ np.asarray(q.dequantize()), rtol=2e-4, atol=5e-3)


def test_value_domain_kernels_decline_and_gradients_flow():
    from jaxq.kernels import dispatch

    q = jaxq.quantize_array(jnp.ones((256, 128)) * jnp.arange(128.0), Q4_1)
    assert "value-domain" in dispatch.unsupported_reason(q.meta, None, 256, 128)
    with pytest.raises(NotImplementedError, match="value-domain"):
        jaxq.ops.qmatmul(jnp.ones((4, 256)), q, impl="interpret")
    g = jax.grad(lambda x: jaxq.ops.qmatmul(x, q).sum())(jnp.ones((2, 256)))
    np.testing.assert_allclose(np.asarray(g[0]), np.asarray(q.dequantize()).sum(1), rtol=1e-5)


def test_value_domain_checkpoint_round_trip(tmp_path):
    w = jnp.asarray(np.random.default_rng(1).normal(size=(64, 32)), jnp.float32)
    tree = {"w": jaxq.quantize_array(w, Q4_1), "c": jaxq.quantize_array(w, jaxq.QuantSpec("int4", granularity="per_group", group_size=32, symmetric=False))}
    path = tmp_path / "ckpt.jaxq"
    jaxq.save(path, tree)
    back = jaxq.load(path)
    assert back["w"].meta.zero_point_domain == "value" and back["c"].meta.zero_point_domain == "code"
    np.testing.assert_array_equal(np.asarray(back["w"].dequantize()), np.asarray(tree["w"].dequantize()))
    # a checkpoint written before the field existed loads as "code"
    blob = path.read_bytes()
    magic, version, n = struct.unpack_from("<8sIQ", blob)
    header = json.loads(blob[20:20 + n])
    del header["tree"]["__dict__"]["c"]["__qarray__"]["zero_point_domain"]
    new = json.dumps(header).encode()
    old = tmp_path / "old.jaxq"
    old.write_bytes(struct.pack("<8sIQ", magic, version, len(new)) + new + blob[20 + n:])
    assert jaxq.load(old)["c"].meta.zero_point_domain == "code"


# --- native block types on import --------------------------------------------------------------
def write_model_gguf(path, cfg: DecoderConfig, tensors: dict[str, tuple[np.ndarray, object]],
                     arch: str | None = None, skip_keys=()):
    """A GGUF file with the config metadata and the given numpy [rows, ne0] tensors."""
    w = gguf.GGUFWriter(str(path), arch or cfg.arch)
    keys = {
        "block_count": cfg.num_layers, "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.num_heads,
        "attention.head_count_kv": cfg.num_kv_heads, "context_length": cfg.max_position_embeddings,
    }
    for k, v in keys.items():
        if k not in skip_keys:
            w.add_uint32(f"{arch or cfg.arch}.{k}", v)
    if "attention.layer_norm_rms_epsilon" not in skip_keys:
        w.add_float32(f"{arch or cfg.arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    for name, (arr, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_tensors(cfg: DecoderConfig, qtype, seed=0) -> dict:
    """Random GGUF tensors for ``cfg``: 2-D ones of ``qtype``, norms F32 (numpy [rows, ne0])."""
    rng = np.random.default_rng(seed)
    out = {}
    for slot in G._layout(cfg):
        shape = tuple(reversed(slot.ne))
        arr = (rng.standard_t(4, size=shape) * 0.05).astype(np.float32)
        if len(shape) == 2:
            arr[0, :32] = 0.0  # an all-zero block: d = 0
            arr[1, :32] = 0.375  # a constant block
            out[slot.gguf] = (arr, qtype)
        else:
            out[slot.gguf] = (1 + arr, Q.F32)
    return out


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("tied", [True, False])
def test_native_blocks_import_bit_exact(tmp_path, qtype, tied):
    cfg = tiny_cfg("llama", tie_word_embeddings=tied, rope_scaling=None)
    path = tmp_path / "m.gguf"
    write_model_gguf(path, cfg, model_tensors(cfg, qtype))
    r = gguf.GGUFReader(str(path))
    params = G.read_params(r, cfg)
    assert G.config_from_gguf(r).tie_word_embeddings == tied
    n2 = 0
    for t in r.tensors:
        slot = next(s for s in G._layout(cfg) if s.gguf == t.name)
        leaf = G._get(params, slot.path)
        ref = reference_tensor(t)
        if len(slot.shape) == 1:
            np.testing.assert_array_equal(np.asarray(leaf), ref)
            continue
        n2 += 1
        assert isinstance(leaf, jaxq.QArray), t.name
        flax_ref = ref.T if slot.kind == "kernel" else ref
        got = np.asarray(leaf.dequantize(jnp.float32))
        assert got.dtype == np.float32 and got.shape == flax_ref.shape
        np.testing.assert_array_equal(got.view(np.uint32), flax_ref.view(np.uint32), err_msg=t.name)
        # the same codes and scales as the file's blocks
        q, d, m = parse_blocks(t.data, qtype)
        codes = np.asarray(leaf.codes).astype(np.int32)
        scale, zp = np.asarray(leaf.scale), leaf.zero_point
        if slot.kind == "kernel":
            codes, scale, zp = codes.T, scale.T, None if zp is None else np.asarray(zp).T
        assert scale.dtype == np.float16
        np.testing.assert_array_equal(scale.view(np.uint16), d.view(np.uint16))
        if qtype == Q.Q8_0:
            np.testing.assert_array_equal(codes, q)
            assert leaf.meta.format == "int8" and leaf.meta.symmetric and zp is None
        else:
            np.testing.assert_array_equal(codes + 8, q)
            assert leaf.meta.format == "int4" and leaf.meta.pack_axis is not None
            if qtype == Q.Q4_1:
                assert leaf.meta.zero_point_domain == "value"
                np.testing.assert_array_equal(np.asarray(zp).view(np.uint16), m.view(np.uint16))
            else:
                assert zp is None and leaf.meta.symmetric
    assert n2 == 7 * cfg.num_layers + (1 if tied else 2)
    if qtype == Q.Q4_1 and tied:  # the model runs on them
        out = logits(cfg, params, jnp.array([[1, 5, 7, 9]]))
        assert out.shape == (1, 4, cfg.vocab_size) and np.all(np.isfinite(out))


def test_other_types_dequantized_and_dtype_and_quantize_options(tmp_path):
    cfg = tiny_cfg("llama", rope_scaling=None, tie_word_embeddings=False)
    tensors = model_tensors(cfg, Q.Q5_0)
    tensors["blk.0.ffn_up.weight"] = (tensors["blk.0.ffn_up.weight"][0], Q.F16)
    tensors["blk.1.ffn_up.weight"] = (tensors["blk.1.ffn_up.weight"][0], Q.Q8_0)
    path = tmp_path / "m.gguf"
    write_model_gguf(path, cfg, tensors)
    r = gguf.GGUFReader(str(path))
    p = G.read_params(r, cfg)
    ref = {t.name: reference_tensor(t) for t in r.tensors}
    q = p["layers_0"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, jax.Array) and q.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q), ref["blk.0.attn_q.weight"].T)
    up = p["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert up.dtype == jnp.float16  # F16 stays F16
    np.testing.assert_array_equal(np.asarray(up, np.float32), ref["blk.0.ffn_up.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["embed_tokens"]["embedding"]), ref["token_embd.weight"])

    pb = G.read_params(r, cfg, dtype=jnp.bfloat16, quantize="int8")
    k = pb["layers_0"]["attn"]["k_proj"]["kernel"]
    assert isinstance(k, jaxq.QArray) and k.meta.format == "int8" and k.dtype == jnp.bfloat16
    want = jaxq.quantize_array(jnp.asarray(ref["blk.0.attn_k.weight"].T), jaxq.QuantSpec("int8"))
    np.testing.assert_array_equal(np.asarray(k.values), np.asarray(want.values))
    assert pb["layers_0"]["attn_norm"]["scale"].dtype == jnp.bfloat16
    assert not isinstance(pb["embed_tokens"]["embedding"], jaxq.QArray)  # presets skip embeddings
    native = pb["layers_1"]["mlp"]["up_proj"]["kernel"]  # Q8_0 stays as it is
    assert native.meta.tiling.group_size == 32 and native.scale.dtype == jnp.float16
    # path-aware policies
    pol = Policy((Rule(r"layers_1/attn/q_proj/kernel", weight="int4-g32"),))
    pp = G.read_params(r, cfg, quantize=pol)
    assert isinstance(pp["layers_1"]["attn"]["q_proj"]["kernel"], jaxq.QArray)
    assert not isinstance(pp["layers_0"]["attn"]["q_proj"]["kernel"], jaxq.QArray)


def test_read_errors_name_the_tensor(tmp_path):
    cfg = tiny_cfg("llama", rope_scaling=None)
    tensors = model_tensors(cfg, Q.Q8_0)
    path = tmp_path / "m.gguf"
    write_model_gguf(path, cfg, tensors)
    bad = tiny_cfg("llama", rope_scaling=None, intermediate_size=128)
    with pytest.raises(G.GGUFError, match=r"blk\.0\.ffn_gate\.weight.*\(64, 96\).*\(64, 128\)"):
        G.read_params(path, bad)
    del tensors["blk.1.attn_v.weight"]
    path2 = tmp_path / "m2.gguf"
    write_model_gguf(path2, cfg, tensors)
    with pytest.raises(G.GGUFError, match=r"blk\.1\.attn_v\.weight.*missing"):
        G.read_params(path2, cfg)
    # a type the gguf package cannot dequantize
    tensors = model_tensors(cfg, Q.Q8_0)
    path3 = tmp_path / "m3.gguf"
    w = gguf.GGUFWriter(str(path3), "llama")
    for name, (arr, qtype) in tensors.items():
        if name == "blk.0.ffn_down.weight":
            shape = gguf.quants.quant_shape_to_byte_shape(arr.shape, Q.Q8_1)
            w.add_tensor(name, np.zeros(shape, np.uint8), raw_dtype=Q.Q8_1)
        elif qtype == Q.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(G.GGUFError, match=r"blk\.0\.ffn_down\.weight.*Q8_1"):
        G.read_params(path3, cfg)


def test_unsupported_architecture_and_missing_keys(tmp_path):
    path = tmp_path / "mamba.gguf"
    cfg = tiny_cfg("llama", rope_scaling=None)
    write_model_gguf(path, cfg, {"token_embd.weight": (np.zeros((288, 64), np.float32), Q.F32)}, arch="mamba")
    with pytest.raises(ValueError, match=r"'mamba'.*supported: llama, qwen2, qwen3, gemma2, gemma3"):
        G.config_from_gguf(str(path))
    path = tmp_path / "nokey.gguf"
    write_model_gguf(path, cfg, {"token_embd.weight": (np.zeros((288, 64), np.float32), Q.F32)},
                     skip_keys=("embedding_length",))
    with pytest.raises(G.GGUFError, match=r"'llama\.embedding_length' is missing"):
        G.config_from_gguf(str(path))


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_round_trip_per_architecture(tmp_path, arch):
    cfg = tiny_cfg(arch)
    params = quant(init_params(cfg), MIXED)
    kinds = {type(x).__name__ for x in jax.tree_util.tree_leaves(params, is_leaf=jaxq.is_qarray)}
    assert kinds == {"QArray", "ArrayImpl"}
    if not cfg.tie_word_embeddings:
        params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"].astype(jnp.bfloat16)
    tok = byte_tokenizer()
    path = tmp_path / f"{arch}.gguf"
    G.save_gguf_params(path, cfg, params, tok)
    cfg2, params2, tok2 = G.load_gguf(path)
    assert cfg2 == cfg, (cfg2, cfg)
    leaves_identical(params, params2)
    ids = jnp.array([[1, 7, 33, 90, 4, 5, 6, 60, 2]])
    a = logits(cfg, params, ids)
    b = logits(cfg2, params2, ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "the cab ate abc 12  x\n"
    assert tok2.encode(text, add_special_tokens=False).ids == tok.encode(text).ids
    # the file is what llama.cpp expects: native block types, F32 norms
    r = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_0 and types["blk.0.attn_v.weight"] == Q.Q8_0
    assert types["blk.1.ffn_gate.weight"] == Q.Q4_1 and types["blk.0.ffn_down.weight"] == Q.F32
    assert types["blk.0.attn_norm.weight"] == Q.F32
    head = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    assert types[head] == Q.Q8_0
    # and gguf's own dequantizer agrees with the QArrays bit for bit
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_gate.weight")
    np.testing.assert_array_equal(reference_tensor(t).T,
                                  np.asarray(params["layers_1"]["mlp"]["gate_proj"]["kernel"].dequantize()))


def test_round_trip_without_tokenizer_keeps_ids(tmp_path):
    cfg = tiny_cfg("qwen3", add_bos=True)
    params = init_params(cfg)
    G.save_gguf_params(tmp_path / "m.gguf", cfg, {"params": params})
    cfg2, params2, tok2 = G.load_gguf(tmp_path / "m.gguf")
    assert tok2 is None and cfg2 == cfg
    leaves_identical(params, params2)


def test_hf_layout_llama_is_permuted_for_llama_cpp(tmp_path):
    cfg = tiny_cfg("llama", rope_interleaved=False, qk_norm=True, qkv_bias=True)
    params = quant(init_params(cfg, 3), MIXED)
    G.save_gguf_params(tmp_path / "m.gguf", cfg, params)
    cfg2, params2, _ = G.load_gguf(tmp_path / "m.gguf")
    assert cfg2.rope_interleaved and cfg2 == dataclasses.replace(cfg, rope_interleaved=True)
    # row 2i of a head = row i, 2i+1 = row i + hd/2 (llama.cpp's converter)
    hd = cfg.head_dim
    q = np.asarray(params["layers_0"]["attn"]["q_proj"]["kernel"].dequantize())
    q2 = np.asarray(params2["layers_0"]["attn"]["q_proj"]["kernel"].dequantize())
    for h in range(cfg.num_heads):
        np.testing.assert_array_equal(q2[:, h * hd:(h + 1) * hd:2], q[:, h * hd:h * hd + hd // 2])
        np.testing.assert_array_equal(q2[:, h * hd + 1:(h + 1) * hd:2], q[:, h * hd + hd // 2:(h + 1) * hd])
    ids = jnp.array([[1, 7, 33, 90, 4, 5]])
    a = logits(cfg, params, ids)
    b = logits(cfg2, params2, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_hf_layout_gemma_norms_are_stored_plus_one(tmp_path):
    cfg = tiny_cfg("gemma3", norm_plus_one=True)
    params = init_params(cfg, 5)
    G.save_gguf_params(tmp_path / "m.gguf", cfg, params)
    cfg2, params2, _ = G.load_gguf(tmp_path / "m.gguf")
    assert not cfg2.norm_plus_one
    np.testing.assert_array_equal(np.asarray(params2["norm"]["scale"]), 1 + np.asarray(params["norm"]["scale"]))
    ids = jnp.array([[1, 7, 33, 90, 4, 5, 8, 9]])
    a = logits(cfg, params, ids)
    b = logits(cfg2, params2, ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("policy,expect", [
    ("int4-g128", r"groups of 128"),
    ("int8", r"channel axes"),
    ("int4-g32", r"float16"),
    (Policy((Rule("kernel", weight=jaxq.QuantSpec("int4", granularity="per_group", group_size=32, symmetric=False,
                                                  scale_dtype="float16")),)), r"value-domain"),
    (Policy((Rule("kernel", weight=jaxq.QuantSpec("nf4", granularity="per_group", group_size=32,
                                                  scale_dtype="float16")),)), r"'nf4'"),
])
def test_export_errors_name_tensor_and_fitting_layouts(tmp_path, policy, expect):
    cfg = tiny_cfg("llama", hidden_size=128, intermediate_size=128, head_dim=32)
    params = quant(init_params(cfg), policy)
    with pytest.raises(G.GGUFError) as e:
        G.save_gguf_params(tmp_path / "m.gguf", cfg, params)
    msg = str(e.value)
    assert "layers_0/attn/q_proj/kernel" in msg and "blk.0.attn_q.weight" in msg
    assert "'q8_0' / 'q4_0' / 'q4_1'" in msg
    assert __import__("re").search(expect, msg), msg


def test_export_rejects_config_switches_gguf_cannot_carry(tmp_path):
    cfg = tiny_cfg("qwen2", activation="gelu_tanh")
    with pytest.raises(G.GGUFError, match="activation"):
        G.save_gguf_params(tmp_path / "m.gguf", cfg, init_params(cfg))
    cfg = tiny_cfg("qwen2")
    params = init_params(cfg)
    params["extra"] = {"kernel": jnp.zeros((2, 2))}
    with pytest.raises(G.GGUFError, match="extra/kernel"):
        G.save_gguf_params(tmp_path / "m.gguf", cfg, params)


# --- SmolLM2 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    """(cfg, params, tokenizer, seconds load_gguf took, the file's reader), loaded once."""
    import time

    t0 = time.perf_counter()
    reader = gguf.GGUFReader(SMOL)
    cfg, params, tok = G.load_gguf(reader)
    return cfg, params, tok, time.perf_counter() - t0, reader


@needs_smol
def test_smollm2_config_and_real_tensors_bit_exact(smol):
    cfg, params, tok, seconds, r = smol
    assert seconds < 60  # ~5 s on a laptop-class CPU
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "llama", 30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_interleaved and cfg.rope_theta == 100000.0
    assert cfg.rms_norm_eps == 1e-5 and cfg.eos_token_ids == (2,) and not cfg.add_bos
    tensors = {t.name: t for t in r.tensors}
    for name, path in (("blk.0.attn_q.weight", ("layers_0", "attn", "q_proj", "kernel")),
                       ("blk.17.ffn_down.weight", ("layers_17", "mlp", "down_proj", "kernel")),
                       ("blk.29.attn_k.weight", ("layers_29", "attn", "k_proj", "kernel")),
                       ("token_embd.weight", ("lm_head", "kernel"))):
        t = tensors[name]
        leaf = G._get(params, path)
        assert isinstance(leaf, jaxq.QArray)
        ref = reference_tensor(t).T
        got = np.asarray(leaf.dequantize())
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32), err_msg=name)
        q, d, m = parse_blocks(np.asarray(t.data), t.tensor_type)
        np.testing.assert_array_equal(np.asarray(leaf.scale).T.view(np.uint16), d.view(np.uint16))
        expected_type = Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1
        assert t.tensor_type == expected_type
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"]), np.asarray(tensors["output_norm.weight"].data))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _is_l(c):
    return unicodedata.category(c).startswith("L")


def _is_n(c):
    return unicodedata.category(c).startswith("N")


def gpt2_split(text: str) -> list[str]:
    """GPT-2's pre-tokenizer regex, by hand:
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    out, i, n = [], 0, len(text)
    while i < n:
        for c in ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d"):
            if text.startswith(c, i):
                out.append(c)
                i += len(c)
                break
        else:
            j = i + 1 if text[i] == " " and i + 1 < n else i
            for pred in (_is_l, _is_n, lambda c: not (c.isspace() or _is_l(c) or _is_n(c))):
                if j < n and pred(text[j]) and not (j == i and text[i].isspace()):
                    k = j
                    while k < n and pred(text[k]):
                        k += 1
                    out.append(text[i:k])
                    i = k
                    break
            else:  # whitespace: \s+(?!\S), else \s+
                k = i
                while k < n and text[k].isspace():
                    k += 1
                if k < n and k - i > 1:
                    k -= 1  # leave the last space to prefix the next word
                out.append(text[i:k])
                i = k
    return out


def reference_bpe_ids(text: str, tokens: list[str], merges: list[str], specials: list[str]) -> list[int]:
    """Pure-Python byte-level BPE with SmolLM2's pre-tokenizer (digits one by one, then GPT-2)."""
    b2u = bytes_to_unicode()
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    out: list[int] = []
    # special tokens split first (longest first)
    segments, i, buf = [], 0, ""
    by_len = sorted(specials, key=len, reverse=True)
    while i < len(text):
        hit = next((s for s in by_len if text.startswith(s, i)), None)
        if hit:
            segments.append(("text", buf)) if buf else None
            segments.append(("special", hit))
            buf, i = "", i + len(hit)
        else:
            buf += text[i]
            i += 1
    if buf:
        segments.append(("text", buf))
    for kind, seg in segments:
        if kind == "special":
            out.append(ids[seg])
            continue
        pieces, cur = [], ""
        for ch in seg:  # Digits(individual_digits=True)
            if _is_n(ch):
                if cur:
                    pieces.append(cur)
                pieces.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            pieces.append(cur)
        for piece in pieces:
            for word in gpt2_split(piece):
                sym = [b2u[b] for b in word.encode("utf-8")]
                while len(sym) > 1:
                    pairs = [(ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(sym, sym[1:]))]
                    best, k = min(pairs)
                    if best == 1 << 30:
                        break
                    a, b = sym[k], sym[k + 1]
                    merged, j = [], 0
                    while j < len(sym):
                        if j < len(sym) - 1 and sym[j] == a and sym[j + 1] == b:
                            merged.append(a + b)
                            j += 2
                        else:
                            merged.append(sym[j])
                            j += 1
                    sym = merged
                out.extend(ids[s] for s in sym)
    return out


PROMPTS = [
    "<|im_start|>user\nWhat is 2+2? 12345<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "The year 1999 had 365 days;  3.14159 is pi, and 1,000,000 is a million.",
    "Punctuation!!! (brackets) [more] {braces} -- dashes... \"quotes\" 'single' @#$%^&*",
    "   leading, trailing   \n\n\tTabs\tand\nnewlines  \n  12  34   ",
    "Don't you'll they've I'm we'd she's it'll",
    "naïve café — 東京 🙂 x² ½",
    "def f(x):\n    return x**2  # comment\n",
]


@needs_smol
def test_smollm2_tokenizer_matches_reference_bpe(smol):
    _, _, tok, _, r = smol
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    assert "<|im_start|>" in specials
    for text in PROMPTS:
        want = reference_bpe_ids(text, tokens, merges, specials)
        got = tok.encode(text).ids  # SmolLM2 adds no BOS
        assert got == want, (text, got, want)
        assert tok.decode(got, skip_special_tokens=False) == text
    chat = tok.encode(PROMPTS[0]).ids
    assert chat[0] == tokens.index("<|im_start|>") and tokens.index("<|im_end|>") in chat
    # digits one by one, also after a space (the upstream "smollm" pre-tokenizer)
    assert [tokens[i] for i in tok.encode(" 12345").ids] == ["Ġ", "1", "2", "3", "4", "5"]


@needs_smol
def test_smollm2_tokenizer_gguf_round_trip(tmp_path, smol):
    cfg, _, tok, _, r0 = smol
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    meta = GT.tokenizer_to_gguf(w, tok, cfg)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert meta["model"] == "gpt2" and meta["pre"] == "smollm"
    r1 = gguf.GGUFReader(str(path))
    for key in ("tokens", "merges", "token_type"):
        assert r1.fields[f"tokenizer.ggml.{key}"].contents() == r0.fields[f"tokenizer.ggml.{key}"].contents(), key
    tok2 = GT.tokenizer_from_gguf(r1)
    for text in PROMPTS:
        assert tok2.encode(text).ids == tok.encode(text).ids


# --- SentencePiece-style tokenizers ---------------------------------------------------------------
@needs_tiny
def test_tinystories_tokenizer_round_trips_through_gguf(tmp_path):
    hf = tokenizers.Tokenizer.from_file(TINY_TOK)
    cfg = DecoderConfig(arch="llama", vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2,
                        num_heads=8, num_kv_heads=4, head_dim=16, bos_token_id=1, eos_token_ids=(2,),
                        add_bos=True, tie_word_embeddings=True)
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    meta = GT.tokenizer_to_gguf(w, hf, cfg)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert meta["model"] == "llama" and meta["add_space_prefix"] and meta["add_bos_token"]
    r = gguf.GGUFReader(str(path))
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert types[0] == GT.UNKNOWN and types[1] == GT.CONTROL and tokens[1] == "<|start_story|>"
    tok = GT.tokenizer_from_gguf(r)
    texts = [
        "Once upon a time, there was a little girl named Lily. She loved to play outside.",
        "One day, Tom saw a big, red ball!  He said, \"Can I play?\" His mom smiled: 'Yes.'",
        "  double  spaces and\nnew lines\n\nand numbers 1234 and ünïcödé ✓ bytes",
        "The end.",
    ]
    for text in texts:
        for special in (False, True):
            want = hf.encode(text, add_special_tokens=special).ids
            assert tok.encode(text, add_special_tokens=special).ids == want, (text, special)
        ids = hf.encode(text).ids
        if hf.token_to_id("<unk>") not in ids:  # (HF spaces <unk> pieces its own way on decode)
            assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
            assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    assert tok.encode("Hi").ids[0] == 1  # BOS


def test_spm_scores_only_with_user_defined_and_byte_fallback(tmp_path):
    # A Gemma-like vocabulary: no merges, scores decide; user-defined runs of spaces / newlines.
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    normal = {"▁": -1.0, "a": -2.0, "b": -2.0, "c": -2.0, "▁a": -3.0, "ab": -4.0, "bc": -1.5, "▁ab": -5.0,
              "abc": -6.0, "▁c": -7.0}
    pieces += list(normal)
    user = ["\n\n", "▁▁▁▁", "<b>"]
    pieces += user
    types = [GT.CONTROL, GT.CONTROL, GT.CONTROL, GT.UNKNOWN] + [GT.BYTE] * 256 + [GT.NORMAL] * len(normal) + \
        [GT.USER_DEFINED] * len(user)
    scores = [0.0] * 260 + list(normal.values()) + [0.0] * len(user)
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    tok = GT.tokenizer_from_gguf(str(path))
    idx = {p: i for i, p in enumerate(pieces)}

    def names(text):
        return [pieces[i] for i in tok.encode(text).ids]

    # llama.cpp's SPM rule by hand: the adjacent pair whose join scores highest merges first.
    # "abc": a b c -> bc (-1.5) beats ab (-4) -> a bc -> abc (-6); "bca": b c a -> bc a ("bca" is no token)
    assert names("abc") == ["<bos>", "abc"]
    assert names("bca") == ["<bos>", "bc", "a"]
    # " ab" -> ▁ a b -> ▁a (-3) before ab (-4) -> ▁a b -> ▁ab
    assert names(" ab") == ["<bos>", "▁ab"]
    # a run of four spaces and a double newline are whole user-defined pieces; é falls back to bytes
    assert names("a    c\n\né") == ["<bos>", "a", "▁▁▁▁", "c", "\n\n", "<0xC3>", "<0xA9>"]
    assert names("<b>a") == ["<bos>", "<b>", "a"]
    assert tok.decode(tok.encode("a    c\n\né<b>").ids) == "a    c\n\né<b>"
    assert idx["<bos>"] == tok.encode("").ids[0]
    # and it exports back (as model "llama" with scores and merges) to the same ids
    path2 = tmp_path / "spm2.gguf"
    w = gguf.GGUFWriter(str(path2), "gemma3")
    meta = GT.tokenizer_to_gguf(w, tok)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert meta["model"] == "llama" and not meta["add_space_prefix"] and meta["add_bos_token"]
    assert [meta["token_type"][idx[p]] for p in ("<bos>", "<unk>", "<0x41>", "ab", "▁▁▁▁")] == [
        GT.CONTROL, GT.UNKNOWN, GT.BYTE, GT.NORMAL, GT.USER_DEFINED]
    back = GT.tokenizer_from_gguf(str(path2))
    for text in ["abc bca  ab", "a    c\n\né<b>", " ab\tc"] + PROMPTS:
        assert back.encode(text).ids == tok.encode(text).ids, text


def test_unknown_pre_tokenizer_and_model_are_clear_errors():
    meta = {"model": "gpt2", "pre": "mystery", "tokens": ["a"], "merges": []}
    with pytest.raises(GT.GGUFTokenizerError, match=r"'mystery'.*smollm"):
        GT.build_tokenizer(meta)
    with pytest.raises(GT.GGUFTokenizerError, match=r"'bert'"):
        GT.build_tokenizer({"model": "bert", "tokens": ["a"]})
    # a tokenizer GGUF cannot carry: a WordLevel model
    wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(GT.GGUFTokenizerError, match="WordLevel"):
        GT.tokenizer_metadata(wl)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2", "smollm", "default"])
def test_byte_level_pre_tokenizers_round_trip(tmp_path, pre):
    tok = byte_tokenizer()
    tok.pre_tokenizer = GT.PRE_TOKENIZERS[pre]()
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    meta = GT.tokenizer_to_gguf(w, tok)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert meta["pre"] == pre
    back = GT.tokenizer_from_gguf(str(path))
    for text in PROMPTS + ["<bos>the cab<eos> 123456 ab c"]:
        assert back.encode(text).ids == tok.encode(text).ids, (pre, text)
