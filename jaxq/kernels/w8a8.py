"""W8A8: int8 activations x int8 (or int4) weights, int32 accumulation.

Epilogue: ``y = acc * x_scale[M, 1] * w_scale[1, N]`` for per-channel weight
scales; for per-group scales the int32 partial of each K group is converted to
float32 and multiplied by that group's scales before the float32 sum. The
``_int32`` variant returns the raw accumulator (what a bit-exact test checks);
the ``_dynamic`` variant takes float activations and quantizes each row inside
the kernel (symmetric int8, absmax / 127, ties to even - the same codes as
``jaxq``'s per-token activation quantization).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.kernels.block_tables import BlockConfig
from jaxq.kernels.matmul import run_matmul

_STATIC = ("packed", "out_dtype", "config", "target", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def w8a8_matmul(
    x_q: jax.Array,
    w: jax.Array,
    x_scale: jax.Array,
    w_scale: jax.Array,
    w_zero_point: jax.Array | None = None,
    *,
    packed: bool = False,
    out_dtype: Any = jnp.bfloat16,
    config: BlockConfig | None = None,
    target: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``(x_q * x_scale) @ dequant(w)`` with an int8 x int8 -> int32 dot.

    Args:
      x_q: int8 activations (M, K).
      w: int8 codes (K, N), or int4 codes packed two per byte along K (K/2, N)
        with ``packed=True``.
      x_scale: float32 per-token (M, 1) or per-tensor (1, 1) activation scale.
      w_scale: float32 weight scale, (1, N) per channel or (K/g, N) per group of g.
      w_zero_point: optional (int4 only) integer-valued zero points, shape of ``w_scale``.
      packed: ``w`` holds int4 codes.
      out_dtype: result dtype (bf16 or f32).
      config: block sizes (default: the device table, see ``block_tables``).
      target: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic) kernel layout; default: the backend's.
      interpret: run in Pallas interpret mode (any backend, CPU included).

    Returns:
      (M, N) in ``out_dtype``.
    """
    return run_matmul(x_q, w, w_scale, w_zero_point, x_scale, mode="int", packed=packed,
                      out_dtype=out_dtype, config=config, target=target, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC[:1] + _STATIC[2:])
def w8a8_matmul_int32(
    x_q: jax.Array,
    w: jax.Array,
    *,
    packed: bool = False,
    config: BlockConfig | None = None,
    target: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The raw int32 accumulator ``x_q @ codes(w)`` (M, N), no scales."""
    return run_matmul(x_q, w, None, None, None, mode="int", packed=packed, out_dtype=jnp.int32,
                      config=config, target=target, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def w8a8_matmul_dynamic(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    w_zero_point: jax.Array | None = None,
    *,
    packed: bool = False,
    out_dtype: Any = jnp.bfloat16,
    config: BlockConfig | None = None,
    target: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """W8A8 with fused dynamic per-token quantization of float activations ``x`` (M, K).

    On GPU (one K slice) the row maxima are computed inside the kernel too; on
    TPU, and on GPU with split-K, they come from one XLA reduction over x and
    only the rounding to int8 is fused.
    """
    return run_matmul(x, w, w_scale, w_zero_point, None, mode="dyn", packed=packed,
                      out_dtype=out_dtype, config=config, target=target, interpret=interpret)
