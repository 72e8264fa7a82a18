"""``flax.linen`` with quantization-aware drop-in layers: ``from jaxq.flax import linen as nn``.

Everything in :mod:`flax.linen` is re-exported unchanged, except four layers that
are subclasses with jaxq's hooks as their defaults:

=================  ==========================================================
``Dense``          ``dot_general`` = :func:`jaxq.flax.hooks.dot_general`
``DenseGeneral``   ``dot_general`` = :func:`jaxq.flax.hooks.dot_general`
``Conv``           ``conv_general_dilated`` = :func:`jaxq.flax.hooks.conv_general_dilated`
``Einsum``         new ``einsum_op`` field = :func:`jaxq.flax.hooks.einsum`
=================  ==========================================================

and ``promote_dtype`` = :func:`jaxq.flax.hooks.promote_dtype`. The class names,
fields, auto-names (``Dense_0``...) and parameter trees are those of Flax, and
on float params the layers compute exactly what Flax computes. On a tree from
:func:`jaxq.quantize` they run jaxq's quantized ops on the stored codes (no float
copy of the weight kept); on a tree from :func:`jaxq.flax.qat_params` they
fake-quantize activations for QAT.

Each layer also talks to the ``"quant_stats"`` collection (:data:`STATS`):

* when it is mutable (a calibration pass, see :func:`jaxq.flax.calibrate`) the
  layer sows statistics of its input (``act_absmax``, ``act_pct``);
* when it holds an ``act_scale`` for the layer (frozen calibration results),
  W8A8 layers quantize activations with that static scale.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as _linen
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as _meta
from flax.errors import ScopeParamShapeError
from flax.linen import *  # noqa: F401,F403  (the rest of flax.linen, unchanged)
from flax.linen import initializers, module  # noqa: F401

from jaxq.flax import hooks
from jaxq.flax.calibration import STATS, record_activation_stats
from jaxq.flax.qat_weight import QatWeight
from jaxq.qarray import QArray

__all__ = ["Conv", "Dense", "DenseGeneral", "Einsum", "QuantLayerMixin", "STATS"]


def __getattr__(name: str) -> Any:  # anything else: straight from flax.linen
    return getattr(_linen, name)


class QuantLayerMixin:
    """Mixin for linen layers that may hold QArray / QatWeight params.

    * ``param`` accepts a quantized kernel: Flax checks a stored param's shape
      against its initializer using the first array leaf, which for a packed
      int4 QArray is the packed code array; here the *logical* shape is checked
      instead (same error type and message as Flax).
    * ``_quant_context`` records calibration statistics and opens the static
      activation-scale context around the wrapped Flax call.

    Use it for your own layers: ``class MyDense(QuantLayerMixin, nn.Dense)``.
    """

    def param(self, name: str, init_fn: Callable[..., Any], *init_args: Any, unbox: bool = True,
              **init_kwargs: Any) -> Any:
        scope = self.scope
        if scope is not None and scope.has_variable("params", name):
            value = scope.get_variable("params", name)
            if isinstance(value, (QArray, QatWeight)):
                expected = jax.eval_shape(lambda: init_fn(jax.random.key(0), *init_args, **init_kwargs))
                expected_shape = tuple(np.shape(_meta.unbox(expected)))
                if tuple(value.shape) != expected_shape:
                    raise ScopeParamShapeError(name, scope.path_text, tuple(value.shape), expected_shape)
                structure = lambda *_: jax.tree_util.tree_map(  # noqa: E731  (leaf shapes as stored)
                    lambda leaf: jnp.zeros(jnp.shape(leaf), leaf.dtype), value)
                return super().param(name, structure, unbox=unbox)
        return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)

    def _quant_call(self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initializing():
            if self.is_mutable_collection(STATS):
                record_activation_stats(self, inputs)
        scale = self.get_variable(STATS, "act_scale") if self.has_variable(STATS, "act_scale") else None
        with hooks.static_act_scale(scale):
            return call(inputs, *args, **kwargs)


class Dense(QuantLayerMixin, _linen.Dense):
    """``flax.linen.Dense`` with jaxq hooks (see module docstring)."""

    promote_dtype: Any = hooks.promote_dtype
    dot_general: Any = hooks.dot_general

    @_linen.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return self._quant_call(super().__call__, inputs)


class DenseGeneral(QuantLayerMixin, _linen.DenseGeneral):
    """``flax.linen.DenseGeneral`` with jaxq hooks (see module docstring)."""

    promote_dtype: Any = hooks.promote_dtype
    dot_general: Any = hooks.dot_general

    @_linen.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return self._quant_call(super().__call__, inputs)


class Conv(QuantLayerMixin, _linen.Conv):
    """``flax.linen.Conv`` with jaxq hooks (see module docstring)."""

    promote_dtype: Any = hooks.promote_dtype
    conv_general_dilated: Any = hooks.conv_general_dilated

    @_linen.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return self._quant_call(super().__call__, inputs)


class Einsum(QuantLayerMixin, _linen.Einsum):
    """``flax.linen.Einsum`` with an ``einsum_op`` hook (linen's has none), defaulting to jaxq's.

    Same fields, parameters and numerics as Flax's ``Einsum``; the only change is
    that the contraction calls ``self.einsum_op`` instead of ``jnp.einsum``.
    """

    promote_dtype: Any = hooks.promote_dtype
    einsum_op: Any = hooks.einsum

    @_linen.compact
    def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
        return self._quant_call(self._einsum, inputs, einsum_str)

    def _einsum(self, inputs: jax.Array, einsum_str: str | None) -> jax.Array:
        # Flax 0.12's linen Einsum.__call__, with jnp.einsum -> self.einsum_op.
        einsum_str = module.merge_param("einsum_str", self.einsum_str, einsum_str)
        einsum_str = einsum_str.replace(" ", "")
        if "->" not in einsum_str:
            raise ValueError('`einsum_str` equation must be explicit and include "->".')
        if einsum_str.count(",") != 1:
            raise ValueError(
                "`einsum_str` equation must have exactly two operands and therefore, exactly one comma "
                f'character, instead of {einsum_str.count(",")}'
            )
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        if self.use_bias:
            bias_shape, broadcasted_bias_shape = self._get_bias_shape(
                einsum_str, inputs, jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        else:
            bias = None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = self.einsum_op(einsum_str, inputs, kernel, precision=self.precision,
                           preferred_element_type=self.preferred_element_type)
        if bias is not None:
            y += jnp.reshape(bias, broadcasted_bias_shape)
        return y
