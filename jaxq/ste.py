"""Fake quantization for training: straight-through estimators (STE) and LSQ.

* :func:`fake_quant` - ``dequantize(quantize(x))`` in the forward pass; in the
  backward pass the gradient passes straight through inside the clipping range
  and is zero outside it (a clipped STE, implemented with ``jax.custom_vjp``).
* :func:`fake_quant_lsq` - the same with a *learnable* scale, using the gradient of
  Learned Step Size Quantization (Esser et al., 2020) for the scale.

Both use the exact numerics of :func:`jaxq.qarray.quantize_array`, so a model
trained with them and then quantized with the learned scales serves the same
outputs it was trained with (what you train is what you serve).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxq.numerics import codec, ranges
from jaxq.spec import QuantSpec, as_spec


def _fq_with_mask(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    fmt = spec.fmt
    if fmt.kind == "none":
        return x, jnp.ones_like(x, dtype=bool)
    if fmt.kind == "cast":
        return x.astype(fmt.storage_dtype).astype(x.dtype), jnp.ones_like(x, dtype=bool)
    tiling = spec.tiling(x.shape)
    xg = tiling.to_grouped(x)
    lo, hi = ranges.select_range(
        xg, tiling.reduce_axes(x.ndim), spec.range_method, fmt, spec.symmetric, spec.percentile, spec.full_range
    )
    scale, zp = codec.scale_and_zero_point(lo, hi, fmt, spec.symmetric, spec.full_range)
    y = codec.decode(codec.encode(xg, scale, zp, fmt, spec.symmetric, spec.full_range), scale, zp, fmt)
    # "Inside" means rounding does not clip: decide in the code domain, where the
    # range edges are exact (absmax/scale*scale can land a hair below absmax).
    u = xg.astype(jnp.float32) / scale
    if fmt.kind == "int":
        qmin, qmax = fmt.int_range(spec.symmetric, spec.full_range)
        u = u + (0.0 if zp is None else zp)
        # A full-range grid maps absmax onto qmax + 0.5 exactly, so allow float slack there.
        mask = (u >= qmin - 0.5) & (u <= qmax + 0.5 + 2.0**-10)
    else:
        mask = jnp.abs(u) <= fmt.max_value * (1 + 2.0**-3)
    return y.reshape(x.shape).astype(x.dtype), mask.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quant(x: jax.Array, spec: QuantSpec) -> jax.Array:
    return _fq_with_mask(x, spec)[0]


def _fake_quant_fwd(x, spec):
    y, mask = _fq_with_mask(x, spec)
    return y, mask


def _fake_quant_bwd(spec, mask, g):
    return (jnp.where(mask, g, jnp.zeros_like(g)),)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, spec: QuantSpec | str) -> jax.Array:
    """Quantize-then-dequantize ``x`` with a clipped straight-through gradient.

    Args:
      x: a float array.
      spec: a :class:`QuantSpec` or short name (``"int8"``, ``"int4-g128"``).

    Returns:
      An array like ``x`` holding the values that the quantized tensor represents.
      ``d out / d x`` is 1 where ``x`` lies inside the clipping range, else 0.
    """
    spec = as_spec(spec)
    if spec is None:
        return x
    return _fake_quant(x, spec)


@jax.custom_vjp
def _scale_grad(s: jax.Array, factor: float) -> jax.Array:
    return s


def _scale_grad_fwd(s, factor):
    return s, factor


def _scale_grad_bwd(factor, g):
    return g * factor, None


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _round_ste(u: jax.Array) -> jax.Array:
    return u + jax.lax.stop_gradient(jnp.round(u) - u)


def fake_quant_lsq(
    x: jax.Array,
    scale: jax.Array,
    spec: QuantSpec | str,
    zero_point: jax.Array | None = None,
    grad_scale: bool = True,
) -> jax.Array:
    """Fake quantization with a learnable scale (LSQ).

    Args:
      x: a float array.
      scale: the scale, in the stored scale shape of ``spec`` for ``x`` (use
        :func:`initial_scale`). Its gradient is LSQ's: ``round(v) - v`` inside
        the range and ``qmin``/``qmax`` outside, scaled by ``1/sqrt(N * qmax)``
        when ``grad_scale`` (N = elements sharing one scale).
      spec: an ``int`` format spec.
      zero_point: fixed zero point for asymmetric specs.

    Returns:
      The fake-quantized ``x``; gradients flow to ``x`` (clipped STE) and ``scale``.
    """
    spec = as_spec(spec)
    fmt = spec.fmt
    if fmt.kind != "int":
        raise ValueError(f"learnable scales need an int format, got {fmt.name!r}; use fake_quant for it")
    qmin, qmax = fmt.int_range(spec.symmetric, spec.full_range)
    tiling = spec.tiling(x.shape)
    xg = tiling.to_grouped(x).astype(jnp.float32)
    s = jnp.abs(scale.astype(jnp.float32))
    if grad_scale:
        per_scale = max(1, x.size // max(1, scale.size))
        s = _scale_grad(s, 1.0 / math.sqrt(per_scale * qmax))
    s = tiling.scale_to_grouped(s)
    z = 0.0 if zero_point is None else tiling.scale_to_grouped(zero_point.astype(jnp.float32))
    u = jnp.clip(xg / s + z, qmin, qmax)
    y = (_round_ste(u) - z) * s
    return y.reshape(x.shape).astype(x.dtype)


def initial_scale(x: jax.Array, spec: QuantSpec | str) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point) that ``spec``'s range method picks for ``x``: LSQ's starting point."""
    from jaxq.qarray import quantize_array  # local: qarray sits above this module's numerics

    q = quantize_array(jax.lax.stop_gradient(x), as_spec(spec))
    return q.scale, q.zero_point
