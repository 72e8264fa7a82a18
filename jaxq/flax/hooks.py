"""The functions jaxq plugs into Flax's official layer hooks.

* :func:`promote_dtype` (linen signature) / :func:`nnx_promote_dtype` (nnx
  signature): Flax's dtype promotion, except that a :class:`~jaxq.QArray` kernel
  passes through untouched (the op computes in the activation dtype and never
  makes a float copy) and a :class:`~jaxq.flax.qat_weight.QatWeight` is cast
  but stays a QAT leaf.
* :func:`dot_general`, :func:`conv_general_dilated`, :func:`einsum`: drop-ins
  for ``jax.lax.dot_general`` / ``jax.lax.conv_general_dilated`` /
  ``jnp.einsum``. Float kernels go straight to JAX (bit-identical to Flax's
  defaults); QArray kernels go to :mod:`jaxq.ops` (weight-only, or W8A8 from
  ``meta.act_spec``); QatWeight kernels fake-quantize the activations with the
  same numerics the serving ops use, then run the float op.

A static (calibrated) activation scale reaches these functions through
:func:`static_act_scale`, a context the jaxq layers open around their own call;
outside it, activation scales are dynamic.

Plug them into stock Flax layers yourself if you prefer::

    nn.Dense(10, dot_general=jaxq.flax.hooks.dot_general, promote_dtype=jaxq.flax.hooks.promote_dtype)
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx.nn import dtypes as _nnx_dtypes

from jaxq import ops
from jaxq.ops.activations import quantize_activation
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec
from jaxq.flax.qat_weight import QatWeight

_STATIC_SCALE: contextvars.ContextVar[Any] = contextvars.ContextVar("jaxq_static_act_scale", default=None)


@contextlib.contextmanager
def static_act_scale(scale: Any) -> Iterator[None]:
    """Within this context the hooks quantize activations with ``scale`` (``None``: dynamic)."""
    token = _STATIC_SCALE.set(scale)
    try:
        yield
    finally:
        _STATIC_SCALE.reset(token)


def current_act_scale() -> Any:
    """The static activation scale of the innermost :func:`static_act_scale` context, or None."""
    return _STATIC_SCALE.get()


# --- dtype promotion ---------------------------------------------------------------------
def _dtype_proxy(x: Any) -> Any:
    if isinstance(x, (QArray, QatWeight)):
        return np.zeros((), x.dtype)
    return x


def _cast(x: Any, dtype: Any, is_kernel: bool) -> Any:
    if x is None:
        return x
    if isinstance(x, QArray):
        # The kernel stays quantized (the op reads the codes); anything else a
        # policy happened to quantize (e.g. a rank-2 DenseGeneral bias) is small
        # and only added, so it is dequantized here.
        return x if is_kernel else x.dequantize(dtype)
    if isinstance(x, QatWeight):
        return x.astype(dtype) if is_kernel else jnp.asarray(x.value, dtype)
    return jnp.asarray(x, dtype)


def promote_dtype(*args: Any, dtype: Any = None, inexact: bool = True) -> list[Any]:
    """``flax.linen.dtypes.promote_dtype`` that keeps QArray / QatWeight kernels (linen signature).

    Flax layers call it as ``promote_dtype(inputs, kernel, bias, dtype=...)``: the
    second argument is the kernel and stays a QArray / QatWeight; other quantized
    arguments are dequantized. Float arguments are cast exactly as Flax casts them.
    """
    dtype = _nnx_dtypes.canonicalize_dtype(*[_dtype_proxy(a) for a in args], dtype=dtype, inexact=inexact)
    return [_cast(a, dtype, is_kernel=(i == 1)) for i, a in enumerate(args)]


def nnx_promote_dtype(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
    """``flax.nnx.nn.dtypes.promote_dtype`` that keeps QArray / QatWeight kernels (nnx signature)."""
    return tuple(promote_dtype(*args, dtype=dtype, inexact=inexact))


# --- activation fake quantization (QAT), mirroring the serving ops -----------------------
def _fake_quant_act(x: jax.Array, spec: QuantSpec, scale: Any) -> jax.Array:
    xq, xs = quantize_activation(jax.lax.stop_gradient(x), spec, scale)
    # Straight-through: forward sees the int8 grid, backward the identity.
    return x + jax.lax.stop_gradient(xq.astype(jnp.float32) * xs - x).astype(x.dtype)


def _dense_like(lhs_ndim: int, rhs_ndim: int, dimension_numbers: Any) -> int:
    """Number of contracted axes if the contraction is Dense-like (trailing x axes with leading w axes), else 0."""
    (lc, rc), (lb, rb) = dimension_numbers
    lc = tuple(a % lhs_ndim for a in lc)
    rc = tuple(a % rhs_ndim for a in rc)
    n = len(rc)
    if not lb and not rb and rc == tuple(range(n)) and lc == tuple(range(lhs_ndim - n, lhs_ndim)):
        return n
    return 0


def _serving_uses_matrix(w: QatWeight, n: int) -> bool:
    """Whether ``jaxq.ops.dot_general`` serves this weight as a (K, N) matrix (see ``ops.general._as_matrix``)."""
    spec = w.meta.weight_spec
    if spec is None or spec.fmt.kind != "int":
        return False
    if w.ndim == 2 and n == 1:
        return True
    tiling = spec.tiling(w.shape)
    if spec.fmt.packed or tiling.group_axis is not None:
        return False
    return all(a % w.ndim >= n for a in tiling.channel_axes)


def _fake_quant_lhs_for_dot(lhs: jax.Array, rhs: QatWeight, dimension_numbers: Any, spec: QuantSpec,
                            scale: Any) -> jax.Array:
    """Activation fake-quant with the rows the serving matmul uses (contracted axes merged there)."""
    n = _dense_like(lhs.ndim, rhs.ndim, dimension_numbers)
    if n > 1 and spec.granularity == "per_token" and scale is None and _serving_uses_matrix(rhs, n):
        lead = lhs.shape[: lhs.ndim - n]
        return _fake_quant_act(lhs.reshape(*lead, -1), spec, None).reshape(lhs.shape)
    return _fake_quant_act(lhs, spec, scale)


def _per_tensor(spec: QuantSpec | None) -> QuantSpec | None:
    """Convolutions quantize activations per tensor (a receptive field mixes pixels)."""
    if spec is None or spec.granularity == "per_tensor":
        return spec
    return spec.replace(granularity="per_tensor")


# --- hooks --------------------------------------------------------------------------------
def dot_general(
    lhs: jax.Array,
    rhs: Any,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``jax.lax.dot_general`` for Flax's ``dot_general=`` hook (float, QArray or QatWeight kernel)."""
    if isinstance(rhs, QatWeight):
        x = lhs
        if rhs.act_spec is not None:
            x = _fake_quant_lhs_for_dot(lhs, rhs, dimension_numbers, rhs.act_spec, current_act_scale())
        return jax.lax.dot_general(x, rhs.value, dimension_numbers, precision, preferred_element_type)
    if isinstance(rhs, QArray):
        scale = current_act_scale() if rhs.meta.act_spec is not None else None
        return ops.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, act_scale=scale)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: Any,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` for Flax's conv hook (float, QArray or QatWeight kernel).

    Activations of W8A8 convolutions are quantized per tensor (static or dynamic),
    in QAT and in serving alike.
    """
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    if isinstance(rhs, QatWeight):
        x = lhs
        spec = _per_tensor(rhs.act_spec)
        if spec is not None:
            x = _fake_quant_act(lhs, spec, current_act_scale())
        return jax.lax.conv_general_dilated(x, rhs.value, *args)
    if isinstance(rhs, QArray):
        spec = _per_tensor(rhs.meta.act_spec)
        scale = current_act_scale() if spec is not None else None
        return ops.conv_general_dilated(lhs, rhs, *args, act_spec=spec, act_scale=scale)
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


def einsum(subscripts: str, *operands: Any, precision: Any = None, preferred_element_type: Any = None,
           **kwargs: Any) -> jax.Array:
    """``jnp.einsum`` for Flax's ``einsum_op=`` hook; the kernel is the last operand."""
    *rest, kernel = operands
    if isinstance(kernel, QatWeight):
        if kernel.act_spec is not None and rest:
            rest[0] = _fake_quant_act(rest[0], kernel.act_spec, current_act_scale())
        kernel = kernel.value
    elif isinstance(kernel, QArray):
        spec = kernel.meta.act_spec
        scale = current_act_scale() if spec is not None else None
        # act_spec passed explicitly: ops.einsum only learns it from a QArray that precedes the activation.
        return ops.einsum(subscripts, *rest, kernel, precision=precision,
                          preferred_element_type=preferred_element_type, act_spec=spec, act_scale=scale,
                          **kwargs)
    return jnp.einsum(subscripts, *rest, kernel, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
