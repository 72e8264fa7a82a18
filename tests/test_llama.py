"""Llama model against the real TinyStories-656K checkpoint (needs $JAXQ_DATA_DIR)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.models import blocks
from jaxq.models.generate import generate_greedy, generate_ids
from jaxq.models.llama import Llama, LlamaConfig
from jaxq.models.llama_weights import load_tinystories
from jaxq.models.lm_eval import kl_and_top1, mean_nll, perplexity, token_nll

README_START = (
    "Once upon a time, a little girl named Lily lived in a small house with her mom, dad, "
    "and her dog, Spot"
)
SENTENCE = (
    "Once upon a time, there was a little boy named Tom. He liked to play with his red ball "
    "in the park. One day, he saw a big dog and they played together."
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    data = os.environ.get("JAXQ_DATA_DIR")
    if not data:
        pytest.skip("JAXQ_DATA_DIR is unset: it must point at the shared data folder "
                    "holding tinystories_656k/")
    return Path(data) / "tinystories_656k"


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    cfg, params, tok = load_tinystories(model_dir.parent)
    return cfg, Llama(cfg), params, tok


# ------------------------------------------------------------------ independent reference


def _numpy_llama_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Plain-numpy float64 Llama forward written from the HF tensors (no jaxq code)."""
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    hf = json.loads((model_dir / "config.json").read_text())
    n_h, n_kv, eps = hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"]
    hd = hf["hidden_size"] // n_h
    t = ids.shape[0]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    def rope(x):  # x: [T, H, hd], HF rotate_half
        inv = 1.0 / hf["rope_theta"] ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(t)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    emb = w["lm_head.weight"]  # tied
    h = emb[ids]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = rope((x @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n_h, hd))
        k = rope((x @ w[p + "self_attn.k_proj.weight"].T).reshape(t, n_kv, hd))
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(t, n_kv, hd)
        k, v = np.repeat(k, n_h // n_kv, axis=1), np.repeat(v, n_h // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, v).reshape(t, n_h * hd)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        g = x @ w[p + "mlp.gate_proj.weight"].T
        u = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    return rms(h, w["model.norm.weight"]) @ emb.T


def test_config_from_hf(model_dir: Path) -> None:
    cfg = LlamaConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        2, 128, 8, 4, 16)
    assert cfg.vocab_size == 2048 and cfg.intermediate_size == 384 and cfg.tie_word_embeddings


def test_logits_match_numpy_reference(loaded, model_dir: Path) -> None:
    cfg, model, params, tok = loaded
    ids = np.asarray(tok.encode(SENTENCE).ids)
    assert ids[0] == 1  # the tokenizer itself prepends BOS
    ref = _numpy_llama_logits(model_dir, ids)
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)[None]))[0]
    assert got.shape == (len(ids), cfg.vocab_size) and got.dtype == np.float32
    assert np.max(np.abs(got - ref)) < 1e-4


def test_param_tree_and_tied_head(loaded) -> None:
    cfg, model, params, _ = loaded
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert set(init) == {"params"}  # init must not leak the dense_inputs collection
    assert jax.tree.map(jnp.shape, init["params"]) == jax.tree.map(jnp.shape, params)
    assert params["layers_0"]["attn"]["k_proj"]["kernel"].shape == (128, 64)
    assert params["layers_1"]["mlp"]["gate_proj"]["kernel"].shape == (128, 384)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["embed_tokens"]["embedding"].T)


def test_greedy_generation_matches_readme(loaded) -> None:
    _, model, params, tok = loaded
    text = generate_greedy(model, params, tok, "Once upon a time", max_new_tokens=40)
    assert text.startswith(README_START), text


def test_nll_natural_below_shuffled(loaded) -> None:
    _, model, params, tok = loaded
    ids = np.asarray(tok.encode(SENTENCE).ids)
    perm = np.random.default_rng(0).permutation(len(ids) - 1) + 1  # keep BOS in front
    shuffled = np.concatenate([ids[:1], ids[perm]])
    windows = jnp.asarray(np.stack([ids, shuffled]))
    nll = token_nll(jax.jit(model.apply)({"params": params}, windows), windows).mean(axis=1)
    assert nll[0] < 5.0 and nll[1] > nll[0] + 3.0, nll  # README: 3.68 vs 11.03


def test_block_by_block_and_dense_input_capture(loaded) -> None:
    _, model, params, tok = loaded
    ids = jnp.asarray([tok.encode(SENTENCE).ids])
    full, state = model.apply({"params": params}, ids, mutable=["dense_inputs"])
    h = blocks.embed(model, params, ids)
    for i in range(model.num_blocks()):
        bp = blocks.block_params(params, i)
        h_next, xs = blocks.apply_block(model, bp, h, capture_inputs=True)
        # Every Dense of the block is captured, with the in-features of its kernel.
        assert jax.tree.map(lambda x: x.shape[-1], xs) == jax.tree.map(
            lambda p: p["kernel"].shape[0], {k: bp[k] for k in ("attn", "mlp")},
            is_leaf=lambda n: isinstance(n, dict) and "kernel" in n)
        normed = h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * bp["attn_norm"]["scale"]
        np.testing.assert_allclose(xs["attn"]["q_proj"], normed, atol=1e-5)
        np.testing.assert_array_equal(xs["attn"]["q_proj"], xs["attn"]["v_proj"])
        np.testing.assert_allclose(
            xs["mlp"]["down_proj"], state["dense_inputs"][f"layers_{i}"]["mlp"]["down_proj"]["inputs"][0],
            atol=1e-6)
        h = h_next
    np.testing.assert_allclose(blocks.head(model, params, h), full, atol=1e-5)


def test_dense_kwargs_reach_every_dense(loaded) -> None:
    cfg, _, params, tok = loaded
    kernels_seen: list[tuple[int, ...]] = []

    def dot_general(lhs, rhs, dims, precision=None, preferred_element_type=None):
        kernels_seen.append(rhs.shape)
        return jax.lax.dot_general(lhs, rhs, dims, precision=precision,
                                   preferred_element_type=preferred_element_type)

    hooked = Llama(cfg, dense_kwargs=flax.core.FrozenDict(dot_general=dot_general))
    hash(hooked)  # must stay usable as a static/hashable linen module
    ids = jnp.asarray([tok.encode("Once upon a time").ids])
    out = hooked.apply({"params": params}, ids)
    assert len(kernels_seen) == 7 * cfg.num_layers + 1  # q,k,v,o,gate,up,down per layer + lm_head
    np.testing.assert_allclose(out, Llama(cfg).apply({"params": params}, ids), atol=1e-6)


def test_lm_eval_helpers(loaded) -> None:
    _, model, params, tok = loaded
    logits_fn = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    ids = np.asarray(tok.encode(SENTENCE).ids)[:16]
    windows = jnp.asarray(np.stack([ids] * 4))
    nll = jax.jit(lambda p, w: mean_nll(logits_fn, p, w, batch_size=4))(params, windows)
    ppl = jax.jit(lambda p, w: perplexity(logits_fn, p, w, batch_size=2))(params, windows)
    np.testing.assert_allclose(ppl, np.exp(nll), rtol=1e-5)

    ref = jax.jit(model.apply)({"params": params}, windows)
    kl, top1 = kl_and_top1(ref, ref)
    assert abs(float(kl)) < 1e-6 and float(top1) == 1.0
    bf16 = jax.jit(Llama(model.config, dtype=jnp.bfloat16).apply)({"params": params}, windows)
    kl, top1 = kl_and_top1(ref, bf16)
    assert 0.0 < float(kl) < 0.05 and float(top1) > 0.9


def test_generate_ids_stops_at_eos(loaded) -> None:
    cfg, model, params, tok = loaded
    ids = generate_ids(model, params, tok.encode("Once upon a time").ids, 200, eos_id=cfg.eos_token_id)
    assert ids[:6] == tok.encode("Once upon a time").ids
    assert cfg.eos_token_id not in ids[6:-1]
