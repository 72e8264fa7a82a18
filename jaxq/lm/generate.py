"""Text generation over a preallocated KV cache: one jitted prefill, one jitted decode loop.

Shapes are bucketed so that compiles are per batch size and length bucket, not per prompt or
token: prompts are left-padded to a multiple of ``bucket`` and the cache holds the padded prompt
plus ``max_new_tokens`` rounded up to ``bucket``. The decode loop is a ``lax.while_loop`` inside
one compiled function that stops when every row has produced an end-of-sequence token.

Sampling: ``temperature=0`` is greedy (argmax). Otherwise logits are divided by the temperature,
restricted to the ``top_k`` largest and to the smallest set whose probability reaches ``top_p``,
and sampled with a key derived from ``seed`` and the step, so a seed gives the same text again.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.lm.model import LM
from jaxq.models.decoder import Decoder
from jaxq.models.kv_cache import KVCache, check_kind


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """Next token per row of ``logits [B, V]`` (greedy when ``temperature == 0``)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, neg, x)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        keep_sorted = before < top_p  # the top token always stays
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, neg)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module",))
def _prefill(module: Decoder, params: Any, tokens: jax.Array, cache: KVCache):
    logits, cache = module.apply({"params": params}, tokens, cache=cache, last_only=True)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("module", "steps", "temperature", "top_k", "top_p"))
def _decode(module: Decoder, params: Any, first: jax.Array, cache: KVCache, key: jax.Array, eos: jax.Array,
            *, steps: int, temperature: float, top_k: int | None, top_p: float | None):
    """Emits ``steps`` tokens per row after ``first`` (which is already chosen), EOS-padded."""
    b = first.shape[0]
    out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(state):
        i, _, _, _, done = state
        return (i < steps) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done = state
        logits, cache = module.apply({"params": params}, tok[:, None], cache=cache, last_only=True)
        nxt = sample_logits(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p)
        nxt = jnp.where(done, eos[0], nxt)
        out = out.at[:, i].set(nxt)
        return i + 1, nxt, cache, out, done | jnp.isin(nxt, eos)

    _, _, cache, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out, done))
    return out


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, length]`` right-aligned token ids and each row's first real slot."""
    toks = np.full((len(prompts), length), pad_id, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        toks[b, length - len(p):] = p
        start[b] = length - len(p)
    return toks, start


def to_left_padded(tokens: np.ndarray, lengths: Sequence[int], padding_side: str) -> list[list[int]]:
    """Rows of an already padded batch as lists of real ids (``padding_side`` = where the pads are)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokens = np.asarray(tokens)
    rows = []
    for row, n in zip(tokens, lengths):
        rows.append([int(t) for t in (row[:n] if padding_side == "right" else row[len(row) - n:])])
    return rows


def generate_ids(
    lm: LM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    kv_cache: str = "float",
    stop_at_eos: bool = True,
    bucket: int = 64,
    params: Any = None,
) -> list[list[int]]:
    """New token ids for each prompt (token id lists of any lengths), cut after the first EOS.

    ``params`` defaults to ``lm.params`` (pass another tree, e.g. a quantized one, to compare).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    check_kind(kv_cache)
    cfg = lm.config
    module = lm.module
    params = lm.params if params is None else params
    plen = _round_up(max(len(p) for p in prompts), bucket)
    total = _round_up(plen + max_new_tokens, bucket)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    toks, start = left_pad(prompts, plen, pad)
    cache = module.init_cache(len(prompts), total, kv_cache, start=jnp.asarray(start))
    logits, cache = _prefill(module, params, jnp.asarray(toks), cache)
    key = jax.random.key(seed)
    first = sample_logits(logits, jax.random.fold_in(key, 0), float(temperature), top_k, top_p)
    eos = cfg.eos_token_ids if (stop_at_eos and cfg.eos_token_ids) else (-1,)
    out = _decode(module, params, first, cache, key, jnp.asarray(eos, jnp.int32), steps=max_new_tokens,
                  temperature=float(temperature), top_k=top_k, top_p=top_p)
    result = []
    for row in np.asarray(jax.device_get(out)).tolist():
        if stop_at_eos:
            for j, t in enumerate(row):
                if t in eos:
                    row = row[: j + 1]
                    break
        result.append(row)
    return result


def generate(
    lm: LM,
    prompts: str | Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    kv_cache: str = "float",
    params: Any = None,
) -> list[str]:
    """Continuations of ``prompts`` (one string each, special tokens removed).

    Args:
      lm: a model from :func:`jaxq.lm.load`.
      prompts: a string or a list of strings (batched; shorter prompts are left-padded).
      max_new_tokens: tokens to generate at most (fewer when a row reaches EOS).
      temperature, top_k, top_p, seed: sampling (``temperature=0``: greedy).
      kv_cache: ``"float"``, ``"int8"`` or ``"fp8"`` (see :mod:`jaxq.models.kv_cache`).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [lm.encode(p) for p in prompts]
    new = generate_ids(lm, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       kv_cache=kv_cache, params=params)
    return [lm.decode(n) for n in new]
