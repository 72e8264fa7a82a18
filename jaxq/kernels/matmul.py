"""The shared entry point behind every public kernel: validate, plan, pad, launch, slice.

Public wrappers (:mod:`jaxq.kernels.w8a8`, :mod:`jaxq.kernels.weight_only`) only
choose the mode; this module owns the operand layout:

* x (M, K) is padded to (Mp, Kp); for int4 weights it is split into its even and
  odd columns, so that the kernel multiplies the low nibbles with x[:, 0::2] and
  the high nibbles with x[:, 1::2] and never interleaves in registers;
* weights (K or K/2, N) are padded with zero codes (and zero scales), which add
  nothing to any dot - padding is what keeps interpret-mode NaN reads and
  compiled out-of-bounds garbage out of the result;
* scales / zero points (G, N) get whole zero groups; activation scales pad with 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.kernels import gpu, tpu
from jaxq.kernels.block_tables import BlockConfig, block_config
from jaxq.kernels.common import check_target, is_pow2, pad2
from jaxq.kernels.plan import Plan, make_plan
from jaxq.kernels.tile import TileSpec


def kernel_kind(mode: str, packed: bool) -> str:
    """Block-table key: W8A8 (int4 weights with int8 activations share its tiles), W8A16, W4A16."""
    if mode in ("int", "dyn"):
        return "w8a8"
    return "w4a16" if packed else "w8a16"


def _check_gpu_plan(plan: Plan, spec: TileSpec, k: int, n_scale_rows: int) -> None:
    """Triton needs power-of-two loads; a group size that is not one cannot compile."""
    depth = plan.kstep // spec.n_x
    if not is_pow2(depth) or depth < (32 if spec.mode != "float" else 16):
        g = k // n_scale_rows if n_scale_rows > 1 else None
        raise NotImplementedError(
            f"group size {g} gives {depth}-deep dots; the Triton GPU kernel needs a power of two "
            f">= {32 if spec.mode != 'float' else 16} per dot (use impl='xla' or a larger group)"
        )


def run_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array | None,
    w_zero_point: jax.Array | None,
    x_scale: jax.Array | None,
    *,
    mode: str,
    packed: bool,
    out_dtype: Any,
    config: BlockConfig | None,
    target: str | None,
    interpret: bool,
) -> jax.Array:
    """Pads, launches the target's driver, and slices the (M, N) result."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"kernels take 2-D x and w, got {x.shape} and {w.shape}")
    m, k = x.shape
    kw = w.shape[0] * (2 if packed else 1)
    if kw != k:
        what = "packed int4 weights hold 2 rows per byte: " if packed else ""
        raise ValueError(f"x has K={k} but the weights have K={kw} ({what}w.shape={w.shape})")
    if w.dtype != jnp.int8:
        raise TypeError(f"weights must be int8 codes (int4: packed int8 bytes), got {w.dtype}")
    if mode == "int" and x.dtype != jnp.int8:
        raise TypeError(f"W8A8 needs int8 activations, got {x.dtype} (use the dynamic variant for floats)")
    if mode != "int" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"activations must be floating point here, got {x.dtype}")
    n = w.shape[1]
    g_rows = 1 if w_scale is None else w_scale.shape[0]
    if w_scale is not None and w_scale.shape[1] != n:
        raise ValueError(f"w_scale must have shape (G, {n}), got {w_scale.shape}")
    if w_zero_point is not None:
        if w_scale is None or w_zero_point.shape != w_scale.shape:
            raise ValueError("w_zero_point needs w_scale and the same shape")
        if mode != "float" and not packed:
            raise NotImplementedError(
                "integer kernels take zero points only for int4 weights (int8 code - zero point "
                "overflows int8); use impl='xla' for asymmetric int8 W8A8"
            )
    target = check_target(target, interpret)
    cfg = config or block_config(kernel_kind(mode, packed), m, target)
    plan = make_plan(m, k, n, g_rows, packed=packed, int_dot=mode != "float",
                     x_itemsize=np.dtype(x.dtype).itemsize, config=cfg, target=target)
    cdt = jnp.dtype(x.dtype).name
    spec = TileSpec(mode=mode, packed=packed, has_scale=w_scale is not None,
                    has_zp=w_zero_point is not None, has_xscale=mode in ("int", "dyn") and w_scale is not None,
                    compute_dtype=cdt)
    if target == "gpu" and not interpret:
        _check_gpu_plan(plan, spec, k, g_rows)

    xp = pad2(x, plan.mp, plan.kp)
    xs = [xp[:, 0::2], xp[:, 1::2]] if packed else [xp]
    wp = pad2(w, plan.kp // (2 if packed else 1), plan.np_)
    sp = None if w_scale is None else pad2(w_scale.astype(jnp.float32), plan.gp, plan.np_)
    zp = None
    if w_zero_point is not None:  # integer-valued: exact in int8 (int4 codes) and in bf16 (|zp| <= 128)
        zdt = jnp.int8 if mode != "float" else x.dtype
        zp = pad2(w_zero_point, plan.gp, plan.np_).astype(zdt)
    xsp = None
    if spec.has_xscale:
        if x_scale is None and mode == "int":
            raise ValueError("W8A8 with int8 activations needs x_scale (shape (M, 1) or (1, 1))")
        if x_scale is not None:
            xsp = pad2(jnp.broadcast_to(jnp.asarray(x_scale, jnp.float32).reshape(-1, 1), (m, 1)), plan.mp, 1, 1.0)
        elif target == "tpu" or plan.split > 1:  # row maxima over the whole K, before the K walk
            xsp = pad2(_row_scales(x), plan.mp, 1, 1.0)
    driver = gpu if target == "gpu" else tpu
    out_dt = jnp.int32 if w_scale is None else out_dtype
    out = driver.launch(xs, wp, sp, zp, xsp, spec=spec, plan=plan, out_dtype=out_dt, interpret=interpret)
    return out[:m, :n]


def _row_scales(x: jax.Array) -> jax.Array:
    """Per-token symmetric int8 scales, exactly as ``jaxq`` quantizes activations (absmax / 127)."""
    from jaxq.kernels.common import absmax_scale

    return absmax_scale(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True))
