"""GPU driver (Pallas Triton lowering): the K loop runs inside the kernel.

Triton launches all grid programs in parallel, so a reduction over K cannot be
a grid axis (unlike TPU, where grid steps run in order and may accumulate into
a revisited output block). Each program owns a (bm, bn) output tile and one of
``split`` K slices; it walks its slice with ``fori_loop``, loading (bm, kstep)
x tiles and (kstep, bn) weight tiles through ``pl.ds``. With ``split > 1`` the
partial tiles (float32, already scaled) are summed by the wrapper - the decode
path (M <= 16) uses that to keep every SM streaming weights.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.kernels.common import absmax_scale, pl, triton_params
from jaxq.kernels.plan import Plan
from jaxq.kernels.tile import TileSpec, tile_dot


def _kernel(*refs: Any, spec: TileSpec, plan: Plan, n_groups: int, amax_in_kernel: bool) -> None:
    it = iter(refs)
    x_refs = [next(it) for _ in range(spec.n_x)]
    w_ref = next(it)
    s_ref = next(it) if spec.has_scale else None
    zp_ref = next(it) if spec.has_zp else None
    xs_ref = next(it) if spec.has_xscale and not amax_in_kernel else None
    o_ref = next(it)
    bm, bn = o_ref.shape
    half = plan.kstep // spec.n_x  # depth of each dot (int4: even and odd halves)

    def load(t):
        off = pl.multiple_of(t * half, half)
        return [r[:, pl.ds(off, half)] for r in x_refs], w_ref[pl.ds(off, half), :]

    x_scale = None
    if amax_in_kernel:  # fused per-token quantization: one pass for the row maxima
        n_steps = n_groups * plan.g_steps

        def amax_step(t, m):
            xt, _ = load(t)
            for v in xt:
                m = jnp.maximum(m, jnp.max(jnp.abs(v.astype(jnp.float32)), axis=1))
            return m

        amax = jax.lax.fori_loop(0, n_steps, amax_step, jnp.zeros((bm,), jnp.float32))
        x_scale = absmax_scale(amax)[:, None]
    elif xs_ref is not None:
        x_scale = xs_ref[...]

    def group(gi, acc):
        zp_row = zp_ref[pl.ds(gi, 1), :] if zp_ref is not None else None

        def step(t, raw):
            xt, wt = load(gi * plan.g_steps + t)
            return raw + tile_dot(xt, wt, zp_row, x_scale, spec)

        if plan.g_steps == 1:  # one dot per group: no inner loop, so Triton pipelines the group loop
            xt, wt = load(gi)
            raw = tile_dot(xt, wt, zp_row, x_scale, spec)
        else:
            raw = jax.lax.fori_loop(0, plan.g_steps, step, jnp.zeros((bm, bn), spec.raw_dtype))
        if s_ref is None:
            return acc + raw
        # Per group: int32 partial -> float32, times that group's scales.
        return acc + raw.astype(jnp.float32) * s_ref[pl.ds(gi, 1), :]

    acc0 = jnp.zeros((bm, bn), spec.raw_dtype if s_ref is None else jnp.float32)
    acc = group(0, acc0) if n_groups == 1 else jax.lax.fori_loop(0, n_groups, group, acc0)
    if x_scale is not None and s_ref is not None:
        acc = acc * x_scale
    o_ref[...] = acc.astype(o_ref.dtype)


def launch(
    xs: list[jax.Array],
    w: jax.Array,
    scale: jax.Array | None,
    zp: jax.Array | None,
    x_scale: jax.Array | None,
    *,
    spec: TileSpec,
    plan: Plan,
    out_dtype: Any,
    interpret: bool,
) -> jax.Array:
    """Runs the kernel on padded operands; returns the padded (Mp, Np) result.

    Operand shapes: ``xs`` (Mp, Kp) or two (Mp, Kp/2) halves; ``w`` (Kp or Kp/2, Np);
    ``scale``/``zp`` (Gp, Np); ``x_scale`` (Mp, 1).
    """
    p = plan
    S = p.split
    kx = p.kp // spec.n_x // S  # x columns (and packed weight rows) per K slice
    n_groups = p.gp // S if p.grouped else 1
    amax_in_kernel = spec.mode == "dyn" and x_scale is None
    if amax_in_kernel and S != 1:
        raise ValueError("in-kernel per-token scales need the whole row: split must be 1")
    grid = (p.mp // p.bm, p.np_ // p.bn, S)
    args = list(xs) + [w]
    in_specs = [pl.BlockSpec((p.bm, kx), lambda i, j, s: (i, s)) for _ in xs]
    in_specs.append(pl.BlockSpec((kx, p.bn), lambda i, j, s: (s, j)))
    srows = n_groups if p.grouped else 1
    smap = (lambda i, j, s: (s, j)) if p.grouped else (lambda i, j, s: (0, j))
    for a in (scale, zp):
        if a is not None:
            args.append(a)
            in_specs.append(pl.BlockSpec((srows, p.bn), smap))
    if x_scale is not None:
        args.append(x_scale)
        in_specs.append(pl.BlockSpec((p.bm, 1), lambda i, j, s: (i, 0)))
    # Partial K slices are summed outside in float32 (int32 for the raw accumulator).
    part_dtype = out_dtype if S == 1 else (jnp.int32 if scale is None else jnp.float32)
    kernel = functools.partial(_kernel, spec=spec, plan=p, n_groups=n_groups, amax_in_kernel=amax_in_kernel)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((S, p.mp, p.np_), part_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, p.bm, p.bn), lambda i, j, s: (s, i, j)),
        compiler_params=triton_params(p.num_warps, p.num_stages),
        interpret=interpret,
        name="jaxq_qmatmul_gpu",
    )(*args)
    return out[0] if S == 1 else jnp.sum(out, axis=0).astype(out_dtype)
