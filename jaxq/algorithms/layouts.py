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
    attention one ``v_proj`` column feeds ``repeat`` ``o_proj`` inputs (one per query head of
    its KV group), so those inputs must share one scale: :meth:`DenseFold.tie` gives the map
    that the algorithms use to tie them (the AWQ reference instead skips ``o_proj`` here).

A group without a fold gets no scaling (AWQ falls back to its clip search only).
Each model gives its own layout (``block_layout(i)``, see :mod:`jaxq.algorithms.protocol`);
any other model gets one group per Dense in call order, without folds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import jax
import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NormFold:
    """``1/s`` goes into the norm at ``path`` (its ``scale`` and, if present, ``bias``).

    ``plus_one``: the norm multiplies by ``1 + scale`` (Gemma's layout), so the stored scale
    becomes ``(1 + scale) / s - 1``.
    """

    path: Path
    plus_one: bool = False


@dataclasses.dataclass(frozen=True)
class DenseFold:
    """``1/s`` goes into the output columns of the Dense at ``path``.

    ``repeat > 1`` (grouped-query attention): input channel ``h * head_dim + d`` of the group is
    fed by column ``(h // repeat) * head_dim + d`` of the target.
    """

    path: Path
    repeat: int = 1
    head_dim: int = 1

    def tie(self, k: int) -> np.ndarray | None:
        """Channel -> target column map for ``k`` input channels (None when one-to-one)."""
        if self.repeat == 1:
            return None
        j = np.arange(k)
        return ((j // self.head_dim) // self.repeat) * self.head_dim + j % self.head_dim

    def target_scale(self, s: jax.Array) -> jax.Array:
        """Per-input-channel ``s [K]`` (tied) -> per-target-column scale."""
        if self.repeat == 1:
            return s
        return s.reshape(-1, self.repeat, self.head_dim)[:, 0, :].reshape(-1)


Fold = Union[NormFold, DenseFold]


@dataclasses.dataclass(frozen=True)
class InputGroup:
    """Dense layers (paths inside the block params) that read one input, and its fold."""

    name: str
    denses: tuple[Path, ...]
    fold: Fold | None = None

    @property
    def can_scale(self) -> bool:
        return self.fold is not None

    def tie(self, k: int) -> np.ndarray | None:
        """Tie map for this group's input scale (see :meth:`DenseFold.tie`)."""
        return self.fold.tie(k) if isinstance(self.fold, DenseFold) else None


def llama_layout(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[InputGroup, ...]:
    """Groups of a Llama block (query head ``h`` reads KV head ``h // repeat``)."""
    return (
        InputGroup("attn_in", (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")), NormFold(("attn_norm",))),
        InputGroup("attn_out", (("attn", "o_proj"),), DenseFold(("attn", "v_proj"), num_heads // num_kv_heads, head_dim)),
        InputGroup("mlp_in", (("mlp", "gate_proj"), ("mlp", "up_proj")), NormFold(("mlp_norm",))),
        InputGroup("mlp_out", (("mlp", "down_proj"),), DenseFold(("mlp", "up_proj"))),
    )


def char_gpt_layout() -> tuple[InputGroup, ...]:
    """Groups of a GPT-2-style block (GELU MLP: ``down_proj`` has no fold)."""
    return (
        InputGroup("attn_in", (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")), NormFold(("attn_norm",))),
        InputGroup("attn_out", (("attn", "o_proj"),), DenseFold(("attn", "v_proj"))),
        InputGroup("mlp_in", (("mlp", "up_proj"),), NormFold(("mlp_norm",))),
        InputGroup("mlp_out", (("mlp", "down_proj"),), None),
    )


def generic_layout(dense_paths: Sequence[Path]) -> tuple[InputGroup, ...]:
    """One group per Dense, in the given (call) order, without folds."""
    return tuple(InputGroup("/".join(p), (tuple(p),), None) for p in dense_paths)
