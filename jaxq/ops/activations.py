"""Quantizing activations on the fly (dynamic) or with a frozen (static) scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.numerics import codec, ranges
from jaxq.spec import QuantSpec


def check_activation_spec(spec: QuantSpec) -> None:
    if spec.fmt.name != "int8" or not spec.symmetric:
        raise ValueError(
            f"activation quantization supports symmetric int8 (got {spec.format}, symmetric={spec.symmetric}); "
            "use QuantSpec('int8', granularity='per_token') or 'per_tensor'"
        )
    if spec.granularity not in ("per_token", "per_tensor"):
        raise ValueError(f"activation granularity must be 'per_token' or 'per_tensor', got {spec.granularity!r}")
    if spec.full_range:
        raise ValueError(
            "activation quantization uses the narrow int8 grid [-127, 127] (the int8 x int8 kernels and "
            "static scales assume it); use QuantSpec('int8', ..., full_range=False) or leave full_range unset"
        )


def activation_scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Dynamic scale of ``x``: one per row (per_token, shape ``[..., 1]``) or one in all (``[1]*ndim``)."""
    axes = (x.ndim - 1,) if spec.granularity == "per_token" else tuple(range(x.ndim))
    lo, hi = ranges.select_range(
        jax.lax.stop_gradient(x), axes, spec.range_method, spec.fmt, True, spec.percentile
    )
    scale, _ = codec.scale_and_zero_point(lo, hi, spec.fmt, True)
    return scale


def quantize_activation(
    x: jax.Array, spec: QuantSpec, scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """int8 codes and float32 scale of ``x`` (``scale`` given: static; else dynamic)."""
    check_activation_spec(spec)
    if scale is None:
        scale = activation_scale(x, spec)
    scale = jnp.asarray(scale, jnp.float32)
    return codec.encode(x, scale, None, spec.fmt, True), scale
