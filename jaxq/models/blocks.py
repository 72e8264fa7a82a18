"""Stage-by-stage application of the models in :mod:`jaxq.models` (for layer-wise algorithms).

Every model here (:class:`~jaxq.models.llama.Llama`, :class:`~jaxq.models.char_gpt.CharGPT`)
has the same shape ``embed -> layers_0 ... layers_{n-1} -> head`` and exposes it as:

* ``model.embed(tokens)`` and ``model.head(h)`` — methods, run via ``apply(method=...)``;
* ``model.block_module(i)`` — an unbound block, applied to ``params['layers_i']``;
* ``model.num_blocks()``.

The helpers below wrap those; they are pure functions (jit them with the model closed over).
A GPTQ-style loop looks like::

    h = embed(model, params, tokens)
    for i in range(model.num_blocks()):
        bp = block_params(params, i)
        _, xs = apply_block(model, bp, h, capture_inputs=True)   # xs['attn']['q_proj']: [B,T,D]
        bp = quantize_block(bp, xs)                               # the algorithm's part
        h = apply_block(model, bp, h)                             # input of the next block
    logits = head(model, params, h)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxq.algorithms import protocol as P

Params = Any


def block_params(params: Params, i: int) -> Params:
    """The param subtree of block ``i`` (``params['layers_i']``)."""
    return P.block_params(params, i)


def embed(model: nn.Module, params: Params, tokens: jax.Array) -> jax.Array:
    """Token ids ``[B, T]`` -> input hidden states of block 0, ``[B, T, D]``."""
    return P.embed(model, params, tokens)


def head(model: nn.Module, params: Params, h: jax.Array) -> jax.Array:
    """Output of the last block ``[B, T, D]`` -> logits ``[B, T, V]``."""
    return P.head(model, params, h)


def apply_block(
    model: nn.Module,
    params_block: Params,
    h: jax.Array,
    *,
    capture_inputs: bool = False,
    index: int = 0,
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Apply block ``index``'s module (with its own param subtree) to hidden states ``h``.

    With ``capture_inputs=True`` also returns the input of every Dense in the block as a nested
    dict mirroring the block's params, e.g. ``xs['mlp']['down_proj']`` is ``[B, T, F]``.
    """
    return P.apply_block(model.block_module(index), params_block, h, capture_inputs=capture_inputs)


dense_inputs_tree = P.dense_inputs_tree
