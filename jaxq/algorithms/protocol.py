"""What the sequential driver needs from a model: the block protocol.

A model that the driver (:mod:`jaxq.algorithms.sequential`) can quantize block by block is
``embed -> layers_0 ... layers_{n-1} -> head`` and provides:

* ``model.apply({'params': p}, tokens, method='embed')`` -> block-0 input ``[B, T, D]``;
* ``model.num_blocks()`` and ``model.block_module(i)``: an unbound Flax module applied to
  ``params['layers_i']`` as ``block.apply({'params': bp}, h) -> h``. Blocks of the same kind
  should compare equal, so that they share one compiled forward;
* every Dense inside a block sows its input under the :data:`DENSE_INPUTS` collection
  (``sow`` is free unless the caller makes the collection mutable);
* optionally ``model.block_layout(i)``: the block's input groups and scale folds
  (:mod:`jaxq.algorithms.layouts`); without it every Dense is its own group, without folds.

The models in :mod:`jaxq.models` implement it; the driver imports no model.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from jaxq.algorithms.layouts import InputGroup, Path, generic_layout

DENSE_INPUTS = "dense_inputs"
"""Name of the variable collection that a block's Dense layers sow their inputs into."""


def block_params(params: Any, i: int) -> Any:
    """The param subtree of block ``i`` (``params['layers_i']``)."""
    return params[f"layers_{i}"]


def embed(model: Any, params: Any, tokens: Any) -> Any:
    """Token ids ``[B, T]`` -> input hidden states of block 0."""
    return model.apply({"params": params}, tokens, method="embed")


def head(model: Any, params: Any, h: Any) -> Any:
    """Output of the last block -> logits."""
    return model.apply({"params": params}, h, method="head")


def block_module(model: Any, i: int) -> Any:
    return model.block_module(i)


def apply_block(block: Any, params_block: Any, h: Any, *, capture_inputs: bool = False):
    """Apply an unbound block module; with ``capture_inputs`` also every Dense input, as a tree."""
    if not capture_inputs:
        return block.apply({"params": params_block}, h)
    out, state = block.apply({"params": params_block}, h, mutable=[DENSE_INPUTS])
    return out, dense_inputs_tree(state[DENSE_INPUTS])


def dense_inputs_tree(captured: Any) -> Any:
    """Turn a raw ``'dense_inputs'`` collection into ``{path...: array}``.

    Each Dense's sow leaf is ``{'inputs': (x_call1, x_call2, ...)}``; several calls are
    concatenated along the batch axis, since for calibration they are simply more rows.
    """
    if isinstance(captured, dict) or hasattr(captured, "items"):
        keys = set(captured.keys())
        if keys == {"inputs"} and isinstance(captured["inputs"], tuple):
            xs = captured["inputs"]
            return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
        return {k: dense_inputs_tree(v) for k, v in captured.items()}
    raise TypeError(f"unexpected node in dense_inputs collection: {type(captured)}")


def block_layout(model: Any, i: int, dense_paths: Sequence[Path]) -> tuple[InputGroup, ...]:
    """The model's layout of block ``i`` when it has one that covers ``dense_paths``, else generic."""
    get = getattr(model, "block_layout", None)
    if get is not None:
        layout = tuple(get(i))
        if {p for g in layout for p in g.denses} == {tuple(p) for p in dense_paths}:
            return layout
    return generic_layout(dense_paths)
