"""Perplexity of a language model on a text, and agreement with a reference model.

The text is tokenized once and cut into non-overlapping windows of ``window`` tokens (each
starting with BOS when the model wants one); every position but the first of a window is
scored. With a reference model (for example the float model a quantized one came from), the
mean ``KL(reference || model)`` of the next-token distributions and the top-1 agreement are
computed on the same positions. ``kv_cache="int8"``/``"fp8"`` runs the windows through a
quantized cache (attention reads the quantized keys and values), which measures the cache's
effect on perplexity.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.lm.model import LM
from jaxq.models.decoder import Decoder
from jaxq.models.kv_cache import check_kind


def token_windows(ids: list[int], window: int, bos: int | None, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping ``[N, window]`` windows of ``ids`` (a BOS first in each when ``bos`` is set)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    step = window - (bos is not None)
    n = len(ids) // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}; "
                         "give a longer text or a smaller window")
    rows = [ids[i * step:(i + 1) * step] for i in range(n)]
    if bos is not None:
        rows = [[bos] + r for r in rows]
    return np.asarray(rows, np.int32)


@functools.lru_cache(maxsize=16)
def _logits_fn(module: Decoder, kv_cache: str):
    if kv_cache == "float":
        return jax.jit(lambda p, t: module.apply({"params": p}, t))

    def run(p, t):
        cache = module.init_cache(t.shape[0], t.shape[1], kv_cache)
        return module.apply({"params": p}, t, cache=cache)[0]

    return jax.jit(run)


@jax.jit
def _batch_metrics(logits: jax.Array, ref: jax.Array | None, tokens: jax.Array):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if ref is None:
        return jnp.sum(nll), jnp.float32(0), jnp.float32(0)
    ref_logp = jax.nn.log_softmax(ref[:, :-1].astype(jnp.float32), axis=-1)
    p = jnp.exp(ref_logp)
    kl = jnp.sum(jnp.where(p > 0, p * (ref_logp - logp), 0.0), axis=-1)
    top1 = jnp.argmax(ref[:, :-1], -1) == jnp.argmax(logits[:, :-1], -1)
    return jnp.sum(nll), jnp.sum(kl), jnp.sum(top1.astype(jnp.float32))


def evaluate(
    lm: LM,
    text: str,
    *,
    reference: LM | None = None,
    window: int = 256,
    batch_size: int = 4,
    max_windows: int | None = None,
    kv_cache: str = "float",
    params: Any = None,
) -> dict[str, Any]:
    """Scores ``lm`` on ``text``.

    Returns:
      ``{"ppl", "nll", "kl", "top1", "bytes", "bits_per_weight", "tokens", "windows", "window",
      "kv_cache"}``: ``kl`` and ``top1`` are ``None`` without a reference; ``tokens`` is the
      number of scored positions; ``bytes`` and ``bits_per_weight`` describe the parameters as
      stored (scales and zero points included).
    """
    check_kind(kv_cache)
    params = lm.params if params is None else params
    if reference is not None and reference.config.vocab_size != lm.config.vocab_size:
        raise ValueError(f"reference vocabulary ({reference.config.vocab_size}) differs from the model's "
                         f"({lm.config.vocab_size}); compare models that share a tokenizer")
    bos = lm.config.bos_token_id if lm.config.add_bos else None
    wins = token_windows(lm.encode(text, add_bos=False), window, bos, max_windows)
    fn = _logits_fn(lm.module, kv_cache)
    ref_fn = None if reference is None else _logits_fn(reference.module, "float")
    nll = kl = top1 = 0.0
    for i in range(0, len(wins), batch_size):
        t = jnp.asarray(wins[i:i + batch_size])
        ref = None if ref_fn is None else ref_fn(reference.params, t)
        a, b, c = _batch_metrics(fn(params, t), ref, t)
        nll, kl, top1 = nll + float(a), kl + float(b), top1 + float(c)
    n = wins.shape[0] * (wins.shape[1] - 1)
    scored = lm.replace(params=params)
    return {
        "ppl": math.exp(nll / n),
        "nll": nll / n,
        "kl": None if reference is None else kl / n,
        "top1": None if reference is None else top1 / n,
        "bytes": scored.nbytes,
        "bits_per_weight": scored.bits_per_weight(),
        "tokens": n,
        "windows": int(wins.shape[0]),
        "window": int(wins.shape[1]),
        "kv_cache": kv_cache,
    }
