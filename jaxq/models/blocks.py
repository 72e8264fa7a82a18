"""Stage-by-stage application of the models in :mod:`jaxq.models` (for layer-wise algorithms).

Every model here (:class:`~jaxq.models.llama.Llama`, :class:`~jaxq.models.char_gpt.CharGPT`)
has the same shape ``embed -> layers_0 ... layers_{n-1} -> head`` and exposes it as:

* ``model.embed(tokens)`` and ``model.head(h)`` — methods, run via ``apply(method=...)``;
* ``model.block_module()`` — an unbound block, applied to ``params['layers_i']``;
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
import jax.numpy as jnp

from jaxq.models.layers import DENSE_INPUTS

Params = Any


def block_params(params: Params, i: int) -> Params:
    """The param subtree of block ``i`` (``params['layers_i']``)."""
    return params[f"layers_{i}"]


def embed(model: nn.Module, params: Params, tokens: jax.Array) -> jax.Array:
    """Token ids ``[B, T]`` -> input hidden states of block 0, ``[B, T, D]``."""
    return model.apply({"params": params}, tokens, method="embed")


def head(model: nn.Module, params: Params, h: jax.Array) -> jax.Array:
    """Output of the last block ``[B, T, D]`` -> logits ``[B, T, V]``."""
    return model.apply({"params": params}, h, method="head")


def apply_block(
    model: nn.Module,
    params_block: Params,
    h: jax.Array,
    *,
    capture_inputs: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Apply one block (with its own param subtree) to hidden states ``h`` ``[B, T, D]``.

    With ``capture_inputs=True`` also returns the input of every Dense in the block as a nested
    dict mirroring the block's params, e.g. ``xs['mlp']['down_proj']`` is ``[B, T, F]``.
    """
    block = model.block_module()
    if not capture_inputs:
        return block.apply({"params": params_block}, h)
    out, state = block.apply({"params": params_block}, h, mutable=[DENSE_INPUTS])
    return out, dense_inputs_tree(state[DENSE_INPUTS])


def dense_inputs_tree(captured: Any) -> Any:
    """Turn a raw ``'dense_inputs'`` collection into ``{path...: array}``.

    Each Dense's sow leaf is ``{'inputs': (x_call1, x_call2, ...)}``; several calls (e.g.
    repeated applies with a carried state) are concatenated along the batch axis, since for
    calibration they are simply more rows.
    """
    if isinstance(captured, dict) or hasattr(captured, "items"):
        keys = set(captured.keys())
        if keys == {"inputs"} and isinstance(captured["inputs"], tuple):
            xs = captured["inputs"]
            return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
        return {k: dense_inputs_tree(v) for k, v in captured.items()}
    raise TypeError(f"unexpected node in dense_inputs collection: {type(captured)}")
