"""Building blocks shared by jaxq's reference models (Llama, char-level GPT).

Two conventions matter for quantization and are used by every model here:

* Every matmul against a weight goes through :class:`Dense`, a drop-in subclass of
  ``flax.linen.Dense``. Each model has a ``dense_kwargs`` field that is splatted into every
  ``Dense`` it builds, so the Flax integration can inject ``dot_general=...``,
  ``promote_dtype=...`` etc. without touching model code. Attention logits, softmax and RoPE
  are plain ``jnp`` (they have no weights).
* :class:`Dense` *sows* its input under the variable collection ``'dense_inputs'``
  (:data:`DENSE_INPUTS`). ``sow`` is a no-op unless the caller makes that collection mutable,
  so capture costs nothing normally and is switched on per call::

      logits, state = model.apply({'params': params}, tokens, mutable=[DENSE_INPUTS])
      x = state[DENSE_INPUTS]['layers_0']['attn']['q_proj']['inputs'][0]

  The capture tree mirrors the param tree (``params/layers_0/attn/q_proj/kernel`` <->
  ``dense_inputs/layers_0/attn/q_proj/inputs``). Following the Flax ``sow`` convention each
  leaf is a tuple with one entry per call, so pass only ``{'params': ...}`` to ``apply``
  (feeding a previous capture back in would append to it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.algorithms.protocol import DENSE_INPUTS  # the sequential driver's capture collection
from jaxq.flax import linen as qnn

Dtype = Any


class Dense(qnn.Dense):
    """jaxq's drop-in ``Dense`` that also records its input in ``'dense_inputs'``.

    Behaves exactly like ``nn.Dense`` on float params (same fields, same params, honours
    ``dot_general``, ``promote_dtype`` ...) and runs quantized on a tree from
    :func:`jaxq.quantize` (it is :class:`jaxq.flax.linen.Dense`). The extra ``sow`` only happens when ``'dense_inputs'`` is mutable
    and never during ``init`` (so ``init`` returns only params).
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not self.is_initializing():
            self.sow(DENSE_INPUTS, "inputs", inputs)
        return super().__call__(inputs)


def make_dense(
    features: int,
    *,
    name: str,
    dtype: Dtype | None,
    param_dtype: Dtype,
    dense_kwargs: Mapping[str, Any],
    use_bias: bool = False,
    kernel_init: Any = nn.initializers.normal(0.02),
) -> Dense:
    """Build a :class:`Dense`; ``dense_kwargs`` is applied last so it may override anything."""
    kwargs: dict[str, Any] = dict(
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init
    )
    kwargs.update(dict(dense_kwargs))
    return Dense(features, name=name, **kwargs)


class RMSNorm(nn.Module):
    """HF-Llama RMSNorm: ``x / sqrt(mean(x^2) + eps) * scale``, statistics in float32."""

    eps: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        # Normalise in float32 even for bf16 activations (as HF does): the mean of squares
        # is the numerically fragile part.
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y.astype(dtype) * scale.astype(dtype)).astype(dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Cos/sin tables ``[T, head_dim]`` in the HF rotate-half layout (frequencies repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, T, H, D]`` by RoPE (HF ``rotate_half``: pairs are (i, i + D/2))."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal scaled-dot-product attention with grouped KV heads.

    ``q``: ``[B, T, Hq, D]``, ``k``/``v``: ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0``. Query head
    ``h`` uses KV head ``h // (Hq // Hkv)``, matching HF ``repeat_kv``. Logits and softmax are
    float32. Returns ``[B, T, Hq, D]`` in ``q.dtype``.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    # Group query heads by the KV head they share instead of materialising repeated K/V.
    qg = q.reshape(b, t, hkv, rep, d).astype(jnp.float32)
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k.astype(jnp.float32)) / jnp.sqrt(
        jnp.float32(d)
    )
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)
