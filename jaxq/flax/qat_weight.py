"""`QatWeight`: the leaf a QAT parameter tree holds in place of a float weight.

It carries the *fake-quantized* weight (``dequantize(quantize(w))`` with a
straight-through gradient, already computed by :func:`jaxq.flax.qat_params`)
and, as static metadata, the specs of the policy rule that matched it. The jaxq
Flax hooks (:mod:`jaxq.flax.hooks`) recognise it and fake-quantize the
activations that meet it with ``act_spec`` exactly as the serving ops quantize
them, so what is trained is what is served.

It is a pytree (one child: the weight), so it flows through ``jit``, ``grad``,
``vmap`` and Flax's param handling. Flax layers that do not know it still work:
``jnp.asarray(leaf)`` yields the fake-quantized weight (``__jax_array__``), and
``leaf[...]`` returns the leaf itself (what ``nnx`` variables ask for).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class QatMeta:
    """Static part of a :class:`QatWeight`.

    Attributes:
      weight_spec: how the weight was fake-quantized (``None``: kept float).
      act_spec: how activations meeting this weight are fake-quantized
        (``None``: weight-only).
      learned_scale: whether the weight used a learnable (LSQ) scale.
    """

    weight_spec: QuantSpec | None
    act_spec: QuantSpec | None
    learned_scale: bool = False


@jax.tree_util.register_pytree_node_class
class QatWeight:
    """A fake-quantized weight plus its activation spec (see module docstring)."""

    __slots__ = ("value", "meta")

    def __init__(self, value: Any, meta: QatMeta):
        self.value = value
        self.meta = meta

    def tree_flatten(self):
        return (self.value,), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(children[0], meta)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def ndim(self) -> int:
        return len(self.value.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.value.dtype)

    @property
    def act_spec(self) -> QuantSpec | None:
        return self.meta.act_spec

    def astype(self, dtype: Any) -> "QatWeight":
        """The same leaf with the weight cast to ``dtype`` (what ``promote_dtype`` needs)."""
        return QatWeight(jnp.asarray(self.value, dtype), self.meta)

    def __getitem__(self, index: Any) -> "QatWeight":
        if index is Ellipsis or index == ():
            return self
        raise TypeError(f"QatWeight supports only [...] indexing, got {index!r}")

    def __jax_array__(self) -> jax.Array:
        return self.value

    def __repr__(self) -> str:
        w = self.meta.weight_spec.format if self.meta.weight_spec else "float"
        a = self.meta.act_spec.format if self.meta.act_spec else "none"
        return f"QatWeight(shape={self.shape}, dtype={self.dtype.name}, weight={w}, act={a})"


def is_qat_weight(x: Any) -> bool:
    return isinstance(x, QatWeight)
