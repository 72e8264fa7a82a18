"""SmolLM2-135M-Instruct from its GGUF file: logits against plain numpy, greedy text, KV cache.

Needs ``$JAXQ_DATA_DIR/smollm2_135m/SmolLM2-135M-Instruct.Q4_1.gguf``; skipped with a reason
otherwise. The numpy reference below reads the file with the ``gguf`` package only (its own
dequantizer), and is written from the GGUF layout: weights [out, in], llama.cpp's permuted Q/K
rows (so RoPE rotates adjacent pairs), RMSNorm, SwiGLU, GQA, tied embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import jaxq.lm  # noqa: E402
from jaxq.lm.generate import generate_ids  # noqa: E402
from jaxq.models.generate import _greedy_loop  # noqa: E402

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def add(a, b):"]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    data = os.environ.get("JAXQ_DATA_DIR")
    if not data:
        pytest.skip("JAXQ_DATA_DIR is unset: it must point at the shared data folder holding smollm2_135m/")
    p = Path(data) / "smollm2_135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        pytest.skip(f"{p} is missing")
    return p


@pytest.fixture(scope="module")
def lm(gguf_path):
    """As loaded: Q4_1 / Q8_0 tensors are QArrays."""
    return jaxq.lm.load(gguf_path)


@pytest.fixture(scope="module")
def float_lm(lm):
    """The same weights dequantized to float32 (identical values; compiles several times faster)."""
    return lm.replace(params=jaxq.dequantize(lm.params, jnp.float32))


def _field(reader, key):
    return reader.fields[key].contents()


def read_reference(path: Path) -> tuple[dict, dict]:
    """Metadata fields and float64 weights of the GGUF file, through the gguf package alone."""
    r = gguf.GGUFReader(str(path))
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    return {k: _field(r, k) for k in r.fields if k.startswith("llama.")}, w


def numpy_smollm2_logits(ref: tuple[dict, dict], ids: list[int]) -> np.ndarray:
    """Float64 forward pass of the GGUF Llama, from the file alone."""
    meta, w = ref
    n_layers = int(meta["llama.block_count"])
    n_h = int(meta["llama.attention.head_count"])
    n_kv = int(meta["llama.attention.head_count_kv"])
    eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
    theta = float(meta["llama.rope.freq_base"])
    emb = w["token_embd.weight"]  # [V, D]
    d = emb.shape[1]
    hd = d // n_h
    t = len(ids)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x [T, H, hd]; adjacent pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = b * cos[:, None] + a * sin[:, None]
        return out

    h = emb[np.asarray(ids)]
    mask = np.tril(np.ones((t, t), bool))
    for i in range(n_layers):
        p = f"blk.{i}."
        x = rms(h, w[p + "attn_norm.weight"])
        q = rope((x @ w[p + "attn_q.weight"].T).reshape(t, n_h, hd))
        k = rope((x @ w[p + "attn_k.weight"].T).reshape(t, n_kv, hd))
        v = (x @ w[p + "attn_v.weight"].T).reshape(t, n_kv, hd)
        out = np.empty((t, n_h, hd))
        for hh in range(n_h):
            kv = hh // (n_h // n_kv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(mask, s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            out[:, hh] = pr @ v[:, kv]
        h = h + out.reshape(t, -1) @ w[p + "attn_output.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        g = x @ w[p + "ffn_gate.weight"].T
        u = x @ w[p + "ffn_up.weight"].T
        h = h + ((g / (1 + np.exp(-g))) * u) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", emb)
    return rms(h, w["output_norm.weight"]) @ head.T


def test_config_from_metadata(lm):
    c = lm.config
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings, c.rope_interleaved) == (1536, 49152, True, True)


def test_logits_match_numpy_reference(lm, gguf_path):
    """Relative error of jaxq's float32 logits <= 1e-4 of the max |logit|, on three prompts."""
    weights = read_reference(gguf_path)
    ids = [lm.encode(p) for p in PROMPTS]
    batch = np.zeros((len(ids), max(map(len, ids))), np.int32)  # right-padded: causal, pads come last
    for i, row in enumerate(ids):
        batch[i, :len(row)] = row
    got_all = np.asarray(lm(jnp.asarray(batch)))  # runs on the QArrays as loaded
    for prompt, row, got in zip(PROMPTS, ids, got_all):
        ref = numpy_smollm2_logits(weights, row)
        err = np.max(np.abs(got[:len(row)] - ref)) / np.max(np.abs(ref))
        assert err <= 1e-4, (prompt, err)


def test_greedy_names_paris(float_lm):
    text = jaxq.lm.generate(float_lm, "The capital of France is", 12)[0]
    assert "Paris" in text, text


def test_kv_cache_greedy_equals_full_recompute(float_lm):
    """Greedy with the float KV cache == greedy by recomputing the whole window at every step."""
    lm = float_lm
    prompts = [lm.encode(p) for p in PROMPTS[:2]]
    new = 8
    cached = generate_ids(lm, prompts, new, stop_at_eos=False)
    module = lm.module
    for ids, got in zip(prompts, cached):
        n = len(ids)
        buf = jnp.zeros((1, n + new), jnp.int32).at[0, :n].set(jnp.asarray(ids, jnp.int32))
        ref = _greedy_loop(module, lm.params, buf, jnp.int32(n), window=n + new, num_new=new)
        assert np.asarray(ref[0, n:]).tolist() == got


def test_quantized_kv_cache_close_to_float(float_lm):
    """int8 / fp8 caches change next-token distributions only slightly on a real prompt."""
    lm = float_lm
    ids = jnp.asarray([lm.encode("Once upon a time, in a small village by the sea, there lived an old fisherman")])
    module = lm.module
    ref = jax.nn.log_softmax(lm(ids), -1)
    run = jax.jit(lambda p, t, c: module.apply({"params": p}, t, cache=c)[0])
    for kind, tol in (("int8", 0.02), ("fp8", 0.1)):
        logits = run(lm.params, ids, module.init_cache(1, ids.shape[1], kind))
        lq = jax.nn.log_softmax(logits, -1)
        kl = float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - lq), -1)))
        assert 0 < kl < tol, (kind, kl)
