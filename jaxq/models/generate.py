"""Greedy decoding for the models in :mod:`jaxq.models`.

The whole decode loop is one jitted ``lax.fori_loop``: each step re-runs the model on a
fixed-length window of a pre-padded token buffer and writes the argmax at the next position.
Full recomputation (no KV cache) keeps it model-agnostic: it only needs
``model.apply({'params': params}, tokens) -> logits``, so quantized params or hooked Dense
layers work unchanged. Right-padding is harmless because attention is causal. For models with
learned positions (char GPT) the window slides once the sequence outgrows the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    """Encode with a HF ``tokenizers.Tokenizer`` (``.ids``) or a simple one returning ids."""
    enc = tokenizer.encode(text)
    return list(getattr(enc, "ids", enc))


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode ids, dropping special tokens (BOS/EOS/UNK) of HF tokenizers by id.

    The TinyStories tokenizer's ``decode(skip_special_tokens=True)`` keeps them (they are
    marked ``normalized``), hence the explicit filter.
    """
    special: set[int] = set()
    if hasattr(tokenizer, "get_added_tokens_decoder"):
        special = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
    return tokenizer.decode([int(i) for i in ids if int(i) not in special])


def _context_length(model: nn.Module) -> int:
    return int(model.config.context_length)


@partial(jax.jit, static_argnames=("model", "window", "num_new"))
def _greedy_loop(
    model: nn.Module, params: Any, buf: jax.Array, prompt_len: jax.Array, *, window: int, num_new: int
) -> jax.Array:
    total = buf.shape[1]

    def step(i: jax.Array, buf: jax.Array) -> jax.Array:
        cur = prompt_len + i  # position being filled
        start = jnp.clip(cur - window, 0, total - window)
        ctx = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=1)
        logits = model.apply({"params": params}, ctx)
        last = jax.lax.dynamic_index_in_dim(logits, cur - 1 - start, axis=1, keepdims=False)
        return buf.at[:, cur].set(jnp.argmax(last, axis=-1).astype(buf.dtype))

    return jax.lax.fori_loop(0, num_new, step, buf)


def generate_ids(
    model: nn.Module,
    params: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt_ids``: returns prompt + new ids (cut after ``eos_id``)."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    n = len(prompt_ids)
    total = n + max_new_tokens
    window = min(_context_length(model), total)
    buf = jnp.zeros((1, total), jnp.int32).at[0, :n].set(jnp.asarray(prompt_ids, jnp.int32))
    out = _greedy_loop(model, params, buf, jnp.int32(n), window=window, num_new=max_new_tokens)
    ids = [int(t) for t in jax.device_get(out[0])]
    if eos_id is not None and eos_id in ids[n:]:
        ids = ids[: ids.index(eos_id, n) + 1]
    return ids


def generate_greedy(
    model: nn.Module,
    params: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    stop_at_eos: bool = True,
) -> str:
    """Greedy text continuation; returns the decoded prompt + continuation.

    ``tokenizer`` is a HF ``tokenizers.Tokenizer`` (TinyStories: BOS is added by its
    ``encode``) or anything with ``encode(str) -> ids`` / ``decode(ids) -> str``. Generation
    stops at the model's ``eos_token_id`` when its config has one and ``stop_at_eos``.
    """
    eos = getattr(model.config, "eos_token_id", None) if stop_at_eos else None
    ids = generate_ids(model, params, encode_ids(tokenizer, prompt), max_new_tokens, eos_id=eos)
    return decode_ids(tokenizer, ids)
