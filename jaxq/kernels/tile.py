"""The arithmetic of one tile, shared by the GPU (Triton) and TPU (Mosaic) drivers.

A driver loads an x tile and a weight tile and calls :func:`tile_dot`; what it
does around that (loop over K inside the kernel on GPU, K as a grid axis on
TPU) is the driver's business. Three modes:

* ``"int"``:   x is int8 already; ``int8 x int8 -> int32`` dot.
* ``"dyn"``:   x is float; each tile is quantized to int8 with its row scale
  inside the kernel (fused dynamic per-token quantization), then the int8 dot.
* ``"float"``: weight-only; the weight tile is cast to x's dtype (Triton needs
  equal operand dtypes), the dot accumulates in float32.

Zero points are subtracted from the codes before the dot. That is exact: in
float mode ``code - zp`` is an integer of magnitude <= 255, which bf16 holds
exactly; in integer mode it is used only for int4 codes, where ``code - zp``
stays within int8.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from jaxq.kernels.common import quantize_tile, unpack_int4_tile

Mode = Literal["int", "dyn", "float"]
MODES: tuple[str, ...] = ("int", "dyn", "float")


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Static description of what a kernel computes (hashable: it parametrises the trace).

    Attributes:
      mode: ``"int"``, ``"dyn"`` or ``"float"`` (see the module docstring).
      packed: weights are int4, two per byte along K (x comes as even/odd halves).
      has_scale: per-channel or per-group weight scales are applied (False for the
        raw int32 accumulator).
      has_zp: weight zero points are given.
      has_xscale: a per-row activation scale multiplies the output (int/dyn modes).
      compute_dtype: dtype of the float-mode dot operands (x's dtype).
    """

    mode: Mode
    packed: bool
    has_scale: bool = True
    has_zp: bool = False
    has_xscale: bool = False
    compute_dtype: str = "float32"

    @property
    def raw_dtype(self):
        """Accumulator dtype of the dot itself."""
        return jnp.int32 if self.mode in ("int", "dyn") else jnp.float32

    @property
    def n_x(self) -> int:
        """How many x operands: (even, odd) column halves for packed int4 weights."""
        return 2 if self.packed else 1


def tile_dot(
    x_tiles: Sequence[jax.Array],
    w_tile: jax.Array,
    zp_row: jax.Array | None,
    x_scale: jax.Array | None,
    spec: TileSpec,
) -> jax.Array:
    """One K-step: ``sum_h x_tiles[h] @ w_h`` in the raw accumulator dtype.

    Args:
      x_tiles: ``[x]`` or ``[x_even, x_odd]`` tiles of shape (bm, depth).
      w_tile: int8 codes (depth, bn), or packed int4 bytes (depth, bn) holding the
        even rows in the low nibbles and the odd rows in the high nibbles
        (unpacked to int32, narrowed back to int8 for the integer dot).
      zp_row: (1, bn) zero points (int8 in integer modes, compute dtype in float mode).
      x_scale: (bm, 1) float32 row scales; only used in ``"dyn"`` mode.
      spec: the static tile description.
    """
    if spec.mode == "dyn":
        x_tiles = [quantize_tile(t, x_scale) for t in x_tiles]
    w_parts = unpack_int4_tile(w_tile) if spec.packed else (w_tile,)
    acc = None
    for xt, wt in zip(x_tiles, w_parts):
        if spec.mode == "float":
            wt = wt.astype(spec.compute_dtype)
            if zp_row is not None:
                wt = wt - zp_row
            d = jnp.dot(xt, wt, preferred_element_type=jnp.float32)
        else:
            if zp_row is not None:  # int4 only: code - zp stays in [-15, 15]
                wt = wt.astype(jnp.int32) - zp_row.astype(jnp.int32)
            d = jnp.dot(xt, wt.astype(jnp.int8), preferred_element_type=jnp.int32)
        acc = d if acc is None else acc + d
    return acc
