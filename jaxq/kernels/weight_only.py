"""Weight-only W8A16 / W4A16: float activations x int8 or packed int4 weights.

The weight tile is dequantized inside the kernel: codes are cast to x's dtype
(Triton needs equal operand dtypes; integers up to 255 are exact in bf16),
zero points subtracted, and the dot accumulates in float32. Scales are applied
to the float32 partial sum of each group (per channel: once at the end), which
is cheaper than scaling every weight element and loses nothing to bf16 rounding.

For M <= 16 (decode) the device table picks the memory-bound path: M padded to
the smallest dot (16 rows on GPU), narrow N tiles, deep K tiles and, on GPU,
split-K so that enough programs stream weights from HBM.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from jaxq.kernels.block_tables import BlockConfig
from jaxq.kernels.matmul import run_matmul


@functools.partial(jax.jit, static_argnames=("packed", "out_dtype", "config", "target", "interpret"))
def weight_only_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    w_zero_point: jax.Array | None = None,
    *,
    packed: bool = False,
    out_dtype: Any = None,
    config: BlockConfig | None = None,
    target: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x @ ((codes(w) - zero_point) * w_scale)`` without materialising float weights.

    Args:
      x: activations (M, K), bf16 / f16 / f32.
      w: int8 codes (K, N), or int4 codes packed two per byte along K (K/2, N).
      w_scale: float32 scales, (1, N) per channel or (K/g, N) per group of g rows.
      w_zero_point: optional integer-valued zero points with the shape of ``w_scale``.
      packed: ``w`` holds int4 codes (W4A16); otherwise int8 codes (W8A16).
      out_dtype: result dtype (default: x's dtype).
      config, target, interpret: as for :func:`jaxq.kernels.w8a8_matmul`.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return run_matmul(x, w, w_scale, w_zero_point, None, mode="float", packed=packed,
                      out_dtype=out_dtype, config=config, target=target, interpret=interpret)


def w8a16_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, w_zero_point: jax.Array | None = None,
                 **kwargs: Any) -> jax.Array:
    """W8A16: :func:`weight_only_matmul` with int8 codes."""
    return weight_only_matmul(x, w, w_scale, w_zero_point, packed=False, **kwargs)


def w4a16_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, w_zero_point: jax.Array | None = None,
                 **kwargs: Any) -> jax.Array:
    """W4A16: :func:`weight_only_matmul` with int4 codes packed along K."""
    return weight_only_matmul(x, w, w_scale, w_zero_point, packed=True, **kwargs)
