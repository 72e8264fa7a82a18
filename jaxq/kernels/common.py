"""Version-guarded Pallas imports and small helpers shared by every kernel.

Pallas moves fast: ``TritonCompilerParams`` became ``triton.CompilerParams`` in
JAX 0.7, ``pl.dot`` moved to the Triton module, and the Triton backend is
deprecated in 0.11. Everything version-specific is resolved here, once, so the
kernels themselves only use APIs that exist in JAX 0.10 and 0.11 alike.

Nothing here touches a device at import time: the module must import on a
CPU-only machine (``JAX_PLATFORMS=cpu``) where only interpret mode runs.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Target = Literal["gpu", "tpu"]
TARGETS: tuple[str, ...] = ("gpu", "tpu")

try:  # Mosaic TPU; present in CPU wheels too (interpret mode needs nothing else).
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover - very old or stripped-down jax
    pltpu = None

try:  # Triton; deprecated in JAX 0.11 but still the simplest int8 dot on GPU.
    from jax.experimental.pallas import triton as plt

    TritonParams: Any = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
except (ImportError, AttributeError):  # pragma: no cover - Triton removed
    plt = None
    TritonParams = None


def triton_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler params; passing them is what selects the Triton lowering on GPU.

    Since JAX 0.9 the default GPU lowering is Mosaic GPU, whose ``pallas_call``
    path is deprecated; an explicit Triton ``CompilerParams`` keeps us on Triton.
    """
    if TritonParams is None:
        raise NotImplementedError("this jax has no Pallas Triton backend; use impl='xla'")
    return TritonParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(dimension_semantics: tuple[str, ...]) -> Any:
    """Mosaic TPU compiler params (``TPUCompilerParams`` before JAX 0.7)."""
    if pltpu is None:  # pragma: no cover
        raise NotImplementedError("this jax has no Pallas TPU backend; use impl='xla'")
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=dimension_semantics)


def tpu_vmem(shape: tuple[int, ...], dtype: Any) -> Any:
    """A VMEM scratch buffer (the interpreter accepts it on CPU as well)."""
    return pltpu.VMEM(shape, dtype)


def default_target() -> Target:
    """The kernel layout that suits the default backend (TPU style on CPU: cheapest to interpret)."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def check_target(target: str | None, interpret: bool) -> Target:
    """Validates ``target`` (default: the backend's layout).

    A compiled kernel is not checked against the current backend here: lowering
    for another platform (``jit(...).trace(...).lower(lowering_platforms=("cuda",))``)
    is legitimate and is how the CPU tests check that the GPU and TPU kernels
    lower; running a compiled kernel on CPU fails in Pallas with "Only interpret
    mode is supported on CPU backend".
    """
    del interpret
    target = default_target() if target is None else target
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target  # type: ignore[return-value]


# --- integer helpers --------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def pad2(a: jax.Array, rows: int, cols: int, value: float = 0) -> jax.Array:
    """Pads a 2-D array at the end to ``(rows, cols)``.

    Kernels never read outside their arrays: interpret mode fills out-of-bounds
    reads with NaN and compiled kernels with garbage, so the wrappers pad every
    operand to whole blocks and slice the result.
    """
    r, c = a.shape
    if (r, c) == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - r), (0, cols - c)), constant_values=value)


# --- in-kernel math (plain jnp, so it lowers on Triton, Mosaic and the interpreter) -----
def unpack_int4_tile(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits packed int4 bytes into (even, odd) rows, both int32 in ``[-8, 7]``.

    Arithmetic shifts sign-extend each nibble. They run on int32 lanes because
    Mosaic TPU has no int8 vector shifts on every chip and Triton computes in
    32-bit registers anyway; interpret mode has no ``pltpu.unpack_elementwise``
    and Triton no int4 type, but every backend has 32-bit shifts. The two halves
    stay apart (no in-kernel interleave): the wrapper splits ``x`` into even and
    odd columns instead.
    """
    w = p.astype(jnp.int32)
    lo = jnp.right_shift(jnp.left_shift(w, 28), 28)
    hi = jnp.right_shift(jnp.left_shift(w, 24), 28)
    return lo, hi


def round_half_even(y: jax.Array) -> jax.Array:
    """``jnp.round`` (ties to even) from floor, because Triton has no lowering for ``round``.

    Exact for the |y| <= 2**22 range that quantization produces.
    """
    r = jnp.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * jnp.floor(r * 0.5)) != 0.0
    return jnp.where(tie & odd, r - 1.0, r)


_TINY = 1e-30  # same threshold as jaxq.numerics.codec: an all-zero row gets scale 1


def absmax_scale(amax: jax.Array, qmax: float = 127.0) -> jax.Array:
    """Symmetric scale from a row's absolute maximum (matches ``codec.scale_and_zero_point``)."""
    s = amax / qmax
    return jnp.where(s > _TINY, s, jnp.ones_like(s))


def quantize_tile(x: jax.Array, scale: jax.Array, qmax: float = 127.0) -> jax.Array:
    """Float tile -> int8 codes with the same rounding as ``codec.encode`` (ties to even)."""
    y = x.astype(jnp.float32) / scale
    return jnp.clip(round_half_even(y), -qmax, qmax).astype(jnp.int8)


@functools.lru_cache(maxsize=None)
def device_kind() -> str:
    """``device_kind`` of the first default device, e.g. ``'NVIDIA H100 80GB HBM3'`` or ``'cpu'``."""
    try:
        return str(jax.devices()[0].device_kind)
    except Exception:  # pragma: no cover - no backend at all
        return "unknown"


__all__ = [
    "TARGETS",
    "Target",
    "absmax_scale",
    "cdiv",
    "check_target",
    "default_target",
    "device_kind",
    "is_pow2",
    "next_pow2",
    "pad2",
    "pl",
    "plt",
    "pltpu",
    "quantize_tile",
    "round_half_even",
    "round_up",
    "tpu_params",
    "tpu_vmem",
    "triton_params",
    "unpack_int4_tile",
]
