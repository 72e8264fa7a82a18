"""Where the Dense layers of a transformer block sit, and which op before each can absorb a scale.

The sequential driver (:mod:`jaxq.algorithms.sequential`) needs two facts about a block that the
parameter tree alone does not give:

* **input groups** — Dense layers that read the same tensor (q/k/v; gate/up), in forward order.
  They share calibration statistics and, for AWQ/SmoothQuant, one input scale ``s``;
* **folds** — the op that produces a group's input, into which ``1/s`` can be folded exactly:

  - :class:`NormFold`: an RMSNorm/LayerNorm right before the group (``gamma / s``, ``beta / s``);
  - :class:`DenseFold`: a linear map whose output reaches the group through ops that commute
    with a per-channel scale (``v_proj -> attention -> o_proj``; ``up_proj -> (silu(gate) * up)
    -> down_proj``): divide that Dense's output columns (and bias) by ``s``. With grouped-query
    attention one ``v_proj`` column feeds several ``o_proj`` inputs, so the fold needs equal
    scales there; like the AWQ reference we then skip the fold (``repeat > 1``).

A group without a usable fold gets no scaling (AWQ falls back to its clip search only).
Layouts are given for :class:`~jaxq.models.Llama` and :class:`~jaxq.models.CharGPT`; any other
model gets one group per Dense in call order, without folds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NormFold:
    """``1/s`` goes into the norm at ``path`` (its ``scale`` and, if present, ``bias``)."""

    path: Path


@dataclasses.dataclass(frozen=True)
class DenseFold:
    """``1/s`` goes into the output columns of the Dense at ``path``; only if ``repeat == 1``."""

    path: Path
    repeat: int = 1

    @property
    def usable(self) -> bool:
        return self.repeat == 1


Fold = Union[NormFold, DenseFold]


@dataclasses.dataclass(frozen=True)
class InputGroup:
    """Dense layers (paths inside the block params) that read one input, and its fold."""

    name: str
    denses: tuple[Path, ...]
    fold: Fold | None = None

    @property
    def can_scale(self) -> bool:
        return self.fold is not None and (not isinstance(self.fold, DenseFold) or self.fold.usable)


def llama_layout(num_heads: int, num_kv_heads: int) -> tuple[InputGroup, ...]:
    """Groups of a :class:`~jaxq.models.llama.LlamaBlock`."""
    return (
        InputGroup("attn_in", (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")), NormFold(("attn_norm",))),
        InputGroup("attn_out", (("attn", "o_proj"),), DenseFold(("attn", "v_proj"), num_heads // num_kv_heads)),
        InputGroup("mlp_in", (("mlp", "gate_proj"), ("mlp", "up_proj")), NormFold(("mlp_norm",))),
        InputGroup("mlp_out", (("mlp", "down_proj"),), DenseFold(("mlp", "up_proj"))),
    )


def char_gpt_layout() -> tuple[InputGroup, ...]:
    """Groups of a :class:`~jaxq.models.char_gpt.GPTBlock` (GELU MLP: ``down_proj`` has no fold)."""
    return (
        InputGroup("attn_in", (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")), NormFold(("attn_norm",))),
        InputGroup("attn_out", (("attn", "o_proj"),), DenseFold(("attn", "v_proj"))),
        InputGroup("mlp_in", (("mlp", "up_proj"),), NormFold(("mlp_norm",))),
        InputGroup("mlp_out", (("mlp", "down_proj"),), None),
    )


def generic_layout(dense_paths: Sequence[Path]) -> tuple[InputGroup, ...]:
    """One group per Dense, in the given (call) order, without folds."""
    return tuple(InputGroup("/".join(p), (tuple(p),), None) for p in dense_paths)


def block_layout(model: Any, dense_paths: Sequence[Path]) -> tuple[InputGroup, ...]:
    """The layout for ``model``'s blocks; ``dense_paths`` (from a capture) checks it and is the fallback."""
    from jaxq.models.char_gpt import CharGPT
    from jaxq.models.llama import Llama

    layout: tuple[InputGroup, ...] | None = None
    if isinstance(model, Llama):
        layout = llama_layout(model.config.num_heads, model.config.num_kv_heads)
    elif isinstance(model, CharGPT):
        layout = char_gpt_layout()
    if layout is not None:
        known = {p for g in layout for p in g.denses}
        if known == {tuple(p) for p in dense_paths}:
            return layout
    return generic_layout(dense_paths)
