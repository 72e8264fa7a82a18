"""`MixedPrecision`: compute, parameter and output dtypes as one frozen policy.

Keep master weights in ``param_dtype`` (fp32), run the model in
``compute_dtype`` (bf16 / fp16), return ``output_dtype``::

    mp = jaxq.flax.MixedPrecision.preset("bf16")     # bf16 compute, fp32 params and outputs
    logits = mp.apply(model.apply)(variables, x)      # gradients flow back to the fp32 master copy

It works with or without quantization: QArray leaves are not copied (only their
logical dtype changes, so the ops compute in ``compute_dtype``), and QAT leaves
are cast like weights. For fp16 add :class:`jaxq.flax.DynamicLossScale`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.flax.qat_weight import QatWeight
from jaxq.qarray import QArray

PyTree = Any

_PRESETS = {
    "fp32": ("float32", "float32", "float32"),
    "bf16": ("bfloat16", "float32", "float32"),
    "fp16": ("float16", "float32", "float32"),
    "pure_bf16": ("bfloat16", "bfloat16", "bfloat16"),
}


def _float_dtype(d: Any, what: str) -> np.dtype:
    dt = jnp.dtype(d)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"MixedPrecision {what} must be a floating dtype, got {dt.name}")
    return dt


def _cast_leaf(x: Any, dtype: np.dtype) -> Any:
    if isinstance(x, QArray):
        if np.dtype(x.meta.dtype) == dtype:
            return x
        return QArray(x.values, x.scale, x.zero_point, dataclasses.replace(x.meta, dtype=dtype))
    if isinstance(x, QatWeight):
        return x.astype(dtype)
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
        return jnp.asarray(x, dtype)
    return x


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (QArray, QatWeight))


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """Frozen dtype policy.

    Attributes:
      compute_dtype: dtype of params and inputs inside the forward pass.
      param_dtype: dtype of the stored (master) params.
      output_dtype: dtype of the outputs handed back to the loss.
    """

    compute_dtype: Any = "float32"
    param_dtype: Any = "float32"
    output_dtype: Any = "float32"

    def __post_init__(self):
        for f in ("compute_dtype", "param_dtype", "output_dtype"):
            object.__setattr__(self, f, _float_dtype(getattr(self, f), f))

    @classmethod
    def preset(cls, name: str) -> "MixedPrecision":
        """``"fp32"``, ``"bf16"`` / ``"fp16"`` (that compute, fp32 params and outputs), ``"pure_bf16"``."""
        if name not in _PRESETS:
            raise ValueError(f"unknown mixed-precision preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(*_PRESETS[name])

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 compute has too little range for small gradients: use :class:`DynamicLossScale`."""
        return self.compute_dtype == np.dtype("float16")

    def cast_to_param(self, tree: PyTree) -> PyTree:
        """Float leaves to ``param_dtype`` (e.g. right after ``init``)."""
        return jax.tree_util.tree_map(lambda x: _cast_leaf(x, self.param_dtype), tree, is_leaf=_is_leaf)

    def cast_to_compute(self, tree: PyTree) -> PyTree:
        """Float leaves (params or inputs) to ``compute_dtype``; integer leaves and codes untouched."""
        return jax.tree_util.tree_map(lambda x: _cast_leaf(x, self.compute_dtype), tree, is_leaf=_is_leaf)

    def cast_to_output(self, tree: PyTree) -> PyTree:
        """Float leaves to ``output_dtype``."""
        return jax.tree_util.tree_map(lambda x: _cast_leaf(x, self.output_dtype), tree, is_leaf=_is_leaf)

    def apply(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wraps ``fn(params, *args, **kwargs)``: params and args cast to compute, outputs to output dtype."""

        def wrapped(params: PyTree, *args: Any, **kwargs: Any) -> Any:
            out = fn(self.cast_to_compute(params), *self.cast_to_compute(args), **kwargs)
            return self.cast_to_output(out)

        return wrapped
