"""Drop-in ``dot_general`` / ``einsum`` / ``conv_general_dilated`` that accept QArrays.

Their signatures match ``jax.lax`` (plus keyword-only quantization options), so
they plug into Flax's official hooks (``Dense(dot_general=...)``,
``Einsum(einsum_op=...)``, ``Conv(conv_general_dilated=...)``). Plain arrays go
straight to ``jax.lax``. A QArray weight takes the fastest exact route:

* a Dense-style contraction (last axes of ``x`` with leading axes of ``w``) goes
  to :func:`jaxq.ops.qmatmul` (kernels, int8 dots, scales after the dot);
* a convolution with per-output-channel scales convolves the codes and scales
  the output; W8A8 convolutions run an int8 x int8 -> int32 convolution;
* anything else dequantizes the weight inside the jitted computation (XLA fuses
  the conversion into the consumer) and, for W8A8 specs, fake-quantizes the
  activations so that the numerics stay those of the quantized model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.ops.activations import quantize_activation
from jaxq.ops.qmatmul import qmatmul
from jaxq.qarray import QArray
from jaxq.spec import QuantSpec
from jaxq.numerics.tiling import Tiling


def _fake_quant_activation(x: jax.Array, act_spec: QuantSpec | None, act_scale) -> jax.Array:
    if act_spec is None:
        return x
    xq, xs = quantize_activation(x, act_spec, act_scale)
    # Straight-through: forward uses the int8 grid, backward sees the identity.
    return x + jax.lax.stop_gradient(xq.astype(jnp.float32) * xs - x).astype(x.dtype)


def _as_matrix(w: QArray, n_contract: int) -> QArray | None:
    """Views a weight whose first ``n_contract`` axes are contracted as (K, N), if exact.

    Exact when the contracted axes share their scales (per-tensor, or per-channel
    on output axes only) and the codes are not packed across the reshaped axes.
    """
    if w.ndim == 2 and n_contract == 1:
        return w
    t = w.meta.tiling
    if w.meta.fmt.kind != "int" or w.meta.pack_axis is not None or t.group_axis is not None:
        return None
    if any(a % w.ndim < n_contract for a in t.channel_axes):
        return None
    k = math.prod(w.shape[:n_contract])
    out_shape = (1,) * n_contract + tuple(w.shape[n_contract:])

    def flat(a):
        return None if a is None else jnp.broadcast_to(a, out_shape).reshape(1, -1)

    meta = dataclasses.replace(w.meta, tiling=Tiling((-1,)), pack_axis=None, act_spec=None)
    return QArray(w.values.reshape(k, -1), flat(w.scale), flat(w.zero_point), meta)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array | QArray,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    act_spec: QuantSpec | None = None,
    act_scale: jax.Array | None = None,
    impl: str | None = None,
    **unused: Any,
) -> jax.Array:
    """``jax.lax.dot_general`` that also takes a QArray ``rhs`` (see module docstring)."""
    if not isinstance(rhs, QArray):
        if act_spec is not None:
            lhs = _fake_quant_activation(lhs, act_spec, act_scale)
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    act_spec = act_spec if act_spec is not None else rhs.meta.act_spec
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc = tuple(a % lhs.ndim for a in lc), tuple(a % rhs.ndim for a in rc)
    n = len(rc)
    dense_like = (
        not lb and not rb
        and rc == tuple(range(n))
        and lc == tuple(range(lhs.ndim - n, lhs.ndim))
    )
    out_dtype = preferred_element_type or lhs.dtype
    if dense_like:
        w2 = _as_matrix(rhs, n)
        if w2 is not None and (act_spec is None or w2.meta.fmt.kind == "int"):
            x2 = lhs.reshape(*lhs.shape[: lhs.ndim - n], -1)
            y = qmatmul(x2, w2, act_spec=act_spec, act_scale=act_scale, impl=impl, out_dtype=out_dtype)
            return y.reshape(*lhs.shape[: lhs.ndim - n], *rhs.shape[n:])
    x = _fake_quant_activation(lhs, act_spec, act_scale)
    return jax.lax.dot_general(x, rhs.dequantize(lhs.dtype), dimension_numbers, precision, preferred_element_type)


def einsum(subscripts: str, *operands: Any, precision: Any = None, preferred_element_type: Any = None,
           act_spec: QuantSpec | None = None, act_scale: jax.Array | None = None, **kwargs: Any) -> jax.Array:
    """``jnp.einsum`` that accepts QArray operands (dequantized inside the computation).

    With an activation spec (given, or recorded in a QArray operand's metadata),
    the float operands are fake-quantized on the int8 grid first.
    """
    if act_spec is None:
        act_spec = next((op.meta.act_spec for op in operands if isinstance(op, QArray)), None)
    ops = [
        op.dequantize() if isinstance(op, QArray) else _fake_quant_activation(op, act_spec, act_scale)
        for op in operands
    ]
    kw = {k: v for k, v in kwargs.items() if k in ("optimize", "out_sharding")}
    return jnp.einsum(subscripts, *ops, precision=precision, preferred_element_type=preferred_element_type, **kw)


def _hashable(v: Any) -> Any:
    """Lists -> tuples (recursively), so conv settings can be static custom_vjp args."""
    if hasattr(v, "_fields"):  # namedtuples such as ConvDimensionNumbers are hashable already
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(a) for a in v)
    return v


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _conv_w8a8(x, codes, w_scale, act_scale, cfg):
    conv_args, act_spec, out_axis, out_dtype = cfg
    xq, xs = quantize_activation(x, act_spec, act_scale)
    acc = jax.lax.conv_general_dilated(xq, codes, *conv_args, preferred_element_type=jnp.int32)
    shape = [1] * x.ndim
    shape[out_axis] = -1
    return (acc.astype(jnp.float32) * xs.reshape(()) * w_scale.astype(jnp.float32).reshape(shape)).astype(out_dtype)


def _conv_w8a8_fwd(x, codes, w_scale, act_scale, cfg):
    return _conv_w8a8(x, codes, w_scale, act_scale, cfg), (x, codes, w_scale, act_scale)


def _conv_w8a8_bwd(cfg, res, g):
    conv_args = cfg[0]
    x, codes, w_scale, act_scale = res
    w = codes.astype(jnp.float32) * w_scale.astype(jnp.float32)
    # Straight-through: the input gradient of the float conv on the dequantized kernel.
    _, vjp = jax.vjp(lambda x: jax.lax.conv_general_dilated(x, w.astype(x.dtype), *conv_args), x)
    (dx,) = vjp(g.astype(x.dtype))
    zero = lambda a: None if a is None else jnp.zeros_like(a)  # noqa: E731
    return dx, np.zeros(codes.shape, dtype=jax.dtypes.float0), zero(w_scale), zero(act_scale)


_conv_w8a8.defvjp(_conv_w8a8_fwd, _conv_w8a8_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array | QArray,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    act_spec: QuantSpec | None = None,
    act_scale: jax.Array | None = None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` that also takes a QArray kernel.

    Per-output-channel weights convolve the integer codes and scale the output
    (no float copy of the kernel); with an int8 activation spec the convolution
    itself runs on int8 x int8 with int32 accumulation (activation scales must be
    per tensor: a receptive field mixes pixels, so per-pixel scales cannot factor
    out). Sub-channel (per-group) kernels are dequantized inside the computation.
    """
    conv = lambda x, w, pet=preferred_element_type: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, pet)
    if not isinstance(rhs, QArray):
        return conv(_fake_quant_activation(lhs, act_spec, act_scale), rhs)
    act_spec = act_spec if act_spec is not None else rhs.meta.act_spec
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    out_feature_axis_w = dn.rhs_spec[0]
    out_feature_axis_y = dn.out_spec[1]
    t = rhs.meta.tiling
    per_out_channel = (
        rhs.meta.fmt.kind == "int" and rhs.zero_point is None and t.group_axis is None
        and t.channel_axes in ((), (out_feature_axis_w - rhs.ndim,))
    )
    if not per_out_channel:
        return conv(_fake_quant_activation(lhs, act_spec, act_scale), rhs.dequantize(lhs.dtype))
    out_dtype = preferred_element_type or lhs.dtype
    scale_shape = [1] * lhs.ndim
    scale_shape[out_feature_axis_y] = -1
    w_scale = rhs.scale.astype(jnp.float32).reshape(scale_shape)
    if act_spec is not None:
        spec = act_spec if act_spec.granularity == "per_tensor" else act_spec.replace(granularity="per_tensor")
        conv_args = _hashable((window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                               feature_group_count, batch_group_count, precision))
        if act_scale is not None:
            act_scale = jnp.asarray(act_scale, jnp.float32)
        cfg = (conv_args, spec, out_feature_axis_y, jnp.dtype(out_dtype))
        return _conv_w8a8(lhs, rhs.codes, rhs.scale, act_scale, cfg)
    acc = conv(lhs, rhs.codes.astype(lhs.dtype), jnp.float32)
    return (acc * w_scale).astype(out_dtype)
