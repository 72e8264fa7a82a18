"""Character-level GPT: structure, hooks and training on Tiny Shakespeare."""

from __future__ import annotations

import os
from pathlib import Path

import flax
import jax
import numpy as np
import pytest

from jaxq.models import blocks
from jaxq.models.char_gpt import (
    CharGPT,
    CharGPTConfig,
    CharTokenizer,
    eval_char_gpt_loss,
    train_char_gpt,
    unigram_entropy,
)
from jaxq.models.generate import generate_greedy

TINY = CharGPTConfig(vocab_size=65, context_length=32, num_layers=2, hidden_size=32, num_heads=4)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    data = os.environ.get("JAXQ_DATA_DIR")
    if not data:
        pytest.skip("JAXQ_DATA_DIR is unset: it must point at the shared data folder "
                    "holding tinyshakespeare/input.txt")
    return (Path(data) / "tinyshakespeare" / "input.txt").read_text()


def test_tokenizer_roundtrip() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8 and tok.decode(tok.encode("world hello")) == "world hello"


def test_structure_blocks_and_hooks() -> None:
    """Param paths, block-by-block == full forward, Dense capture, dense_kwargs on every Dense."""
    cfg = TINY
    seen = []

    def dot_general(lhs, rhs, dims, precision=None, preferred_element_type=None):
        seen.append(rhs.shape)
        return jax.lax.dot_general(lhs, rhs, dims, precision=precision,
                                   preferred_element_type=preferred_element_type)

    model = CharGPT(cfg, dense_kwargs=flax.core.FrozenDict(dot_general=dot_general))
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.context_length), 0, cfg.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    assert set(variables) == {"params"}
    params = variables["params"]
    assert params["layers_1"]["attn"]["q_proj"]["kernel"].shape == (32, 32)
    assert params["layers_0"]["mlp"]["up_proj"]["kernel"].shape == (32, 128)
    assert params["lm_head"]["kernel"].shape == (32, 65)

    seen.clear()
    full, state = model.apply({"params": params}, tokens, mutable=["dense_inputs"])
    assert full.shape == (2, cfg.context_length, cfg.vocab_size)
    assert len(seen) == 6 * cfg.num_layers + 1  # q,k,v,o,up,down per block + lm_head

    h = blocks.embed(model, params, tokens)
    for i in range(model.num_blocks()):
        h_next, xs = blocks.apply_block(model, blocks.block_params(params, i), h, capture_inputs=True)
        assert xs["mlp"]["down_proj"].shape == (2, cfg.context_length, 128)
        np.testing.assert_allclose(
            xs["attn"]["o_proj"], state["dense_inputs"][f"layers_{i}"]["attn"]["o_proj"]["inputs"][0],
            atol=1e-6)
        h = h_next
    np.testing.assert_allclose(blocks.head(model, params, h), full, atol=1e-5)


def test_few_steps_reduce_loss(shakespeare: str) -> None:
    tok = CharTokenizer.from_text(shakespeare)
    cfg = TINY
    train, held_out = shakespeare[:20000], shakespeare[20000:30000]
    p0 = train_char_gpt(train, cfg, steps=0, tokenizer=tok, progress=False)
    p = train_char_gpt(train, cfg, steps=40, batch=16, lr=3e-3, tokenizer=tok, progress=False)
    before = eval_char_gpt_loss(p0, held_out, cfg, tokenizer=tok, batch=16, num_batches=2)
    after = eval_char_gpt_loss(p, held_out, cfg, tokenizer=tok, batch=16, num_batches=2)
    assert after < before - 0.5, (before, after)


@pytest.mark.slow
def test_300_steps_beat_unigram_entropy(shakespeare: str) -> None:
    tok = CharTokenizer.from_text(shakespeare)
    cfg = CharGPTConfig(vocab_size=tok.vocab_size, context_length=64, num_layers=2,
                        hidden_size=64, num_heads=4)
    train, held_out = shakespeare[:-100_000], shakespeare[-100_000:]
    params = train_char_gpt(train, cfg, steps=300, batch=32, lr=3e-3, seed=0, tokenizer=tok)
    loss = eval_char_gpt_loss(params, held_out, cfg, tokenizer=tok)
    h_unigram = unigram_entropy(shakespeare)  # ~3.31 nats/char
    assert loss < h_unigram - 0.7, (loss, h_unigram)  # seen: ~2.31
    text = generate_greedy(CharGPT(cfg), params, tok, "ROMEO:", max_new_tokens=80)
    assert text.startswith("ROMEO:") and len(text) == 86
