"""Language-model evaluation: next-token NLL / perplexity and agreement with a reference model.

All functions are pure ``jnp`` and jittable (``logits_fn`` and ``batch_size`` static).
Logits are ``[..., T, V]`` and position ``t`` predicts token ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

LogitsFn = Callable[[Any, jax.Array], jax.Array]


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-position next-token NLL (nats): ``[B, T, V], [B, T] -> [B, T - 1]``, float32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def mean_nll(
    logits_fn: LogitsFn, params: Any, token_windows: jax.Array, batch_size: int | None = None
) -> jax.Array:
    """Mean next-token NLL (nats) of ``logits_fn(params, windows)`` over ``[N, T]`` windows.

    ``batch_size`` (must divide ``N``) evaluates the windows in chunks with ``lax.map`` to bound
    the ``[batch, T, V]`` logits memory; ``None`` runs all windows at once.
    """
    token_windows = jnp.asarray(token_windows)
    n = token_windows.shape[0]
    if batch_size is None or batch_size >= n:
        return jnp.mean(token_nll(logits_fn(params, token_windows), token_windows))
    if n % batch_size:
        raise ValueError(f"batch_size={batch_size} must divide the number of windows {n}")
    chunks = token_windows.reshape(n // batch_size, batch_size, -1)
    # Equal-size chunks => the mean of chunk means is the overall mean.
    per_chunk = jax.lax.map(lambda w: jnp.mean(token_nll(logits_fn(params, w), w)), chunks)
    return jnp.mean(per_chunk)


def perplexity(
    logits_fn: LogitsFn, params: Any, token_windows: jax.Array, batch_size: int | None = None
) -> jax.Array:
    """``exp(mean next-token NLL)`` over ``[N, T]`` token windows (see :func:`mean_nll`)."""
    return jnp.exp(mean_nll(logits_fn, params, token_windows, batch_size))


def kl_and_top1(ref_logits: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean ``KL(ref || q)`` (nats) of next-token distributions and top-1 agreement.

    Both inputs are ``[..., V]``; every leading position counts equally. Top-1 agreement is the
    fraction of positions where both argmaxes coincide. Computed in float32.
    """
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ref_p = jnp.exp(ref_logp)
    # where(): a masked (-inf) reference logit has p = 0 and contributes 0, not 0 * inf = nan.
    kl = jnp.sum(jnp.where(ref_p > 0, ref_p * (ref_logp - logq), 0.0), axis=-1)
    top1 = jnp.argmax(ref_logits, axis=-1) == jnp.argmax(logits, axis=-1)
    return jnp.mean(kl), jnp.mean(top1.astype(jnp.float32))
