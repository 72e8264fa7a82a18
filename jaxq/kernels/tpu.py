"""TPU driver (Pallas Mosaic lowering): K is the last, sequential grid axis.

TPU grid steps run in order on a core, so the classic pipeline applies: the
(i, j) output tile stays resident while k walks K, accumulating in VMEM scratch;
Pallas double-buffers the x and weight DMAs behind the compute. Scales and zero
points come as whole (Gp, bn) columns - a block of a few scale rows would break
the (8, 128) rule - and the kernel picks its group's row with a dynamic slice.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.kernels.common import pl, tpu_params, tpu_vmem
from jaxq.kernels.plan import Plan
from jaxq.kernels.tile import TileSpec, tile_dot


def _kernel(*refs: Any, spec: TileSpec, plan: Plan) -> None:
    it = iter(refs)
    x_refs = [next(it) for _ in range(spec.n_x)]
    w_ref = next(it)
    s_ref = next(it) if spec.has_scale else None
    zp_ref = next(it) if spec.has_zp else None
    xs_ref = next(it) if spec.has_xscale else None
    o_ref, acc_ref, raw_ref = next(it), next(it), next(it)
    k = pl.program_id(2)
    n_k = pl.num_programs(2)
    half = plan.kstep // spec.n_x

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        raw_ref[...] = jnp.zeros_like(raw_ref)

    x_scale = xs_ref[...] if xs_ref is not None else None
    for t in range(plan.sub):  # static: `sub` whole groups per grid step
        sl = slice(t * half, (t + 1) * half)
        gs = k * plan.sub + t  # global dot index
        gi = gs // plan.g_steps  # its scale group
        zp_row = zp_ref[pl.ds(gi, 1), :] if zp_ref is not None else None
        d = tile_dot([r[:, sl] for r in x_refs], w_ref[sl, :], zp_row, x_scale, spec)
        if s_ref is None:
            raw_ref[...] += d
        elif plan.g_steps == 1:
            acc_ref[...] += d.astype(jnp.float32) * s_ref[pl.ds(gi, 1), :]
        else:  # a group spans several grid steps: keep integers until it ends
            raw_ref[...] += d

            @pl.when((gs + 1) % plan.g_steps == 0)
            def _flush():
                acc_ref[...] += raw_ref[...].astype(jnp.float32) * s_ref[pl.ds(gi, 1), :]
                raw_ref[...] = jnp.zeros_like(raw_ref)

    @pl.when(k == n_k - 1)
    def _store():
        if s_ref is None:
            o_ref[...] = raw_ref[...].astype(o_ref.dtype)
            return
        acc = acc_ref[...]
        if x_scale is not None:
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
    """Runs the kernel on padded operands (same layout as :func:`jaxq.kernels.gpu.launch`)."""
    p = plan
    bkx = p.bk // spec.n_x
    grid = (p.mp // p.bm, p.np_ // p.bn, p.kp // p.bk)
    args = list(xs) + [w]
    in_specs = [pl.BlockSpec((p.bm, bkx), lambda i, j, k: (i, k)) for _ in xs]
    in_specs.append(pl.BlockSpec((bkx, p.bn), lambda i, j, k: (k, j)))
    for a in (scale, zp):
        if a is not None:
            args.append(a)
            in_specs.append(pl.BlockSpec((p.gp, p.bn), lambda i, j, k: (0, j)))
    if x_scale is not None:
        args.append(x_scale)
        in_specs.append(pl.BlockSpec((p.bm, 1), lambda i, j, k: (i, 0)))
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, plan=p),
        out_shape=jax.ShapeDtypeStruct((p.mp, p.np_), out_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((p.bm, p.bn), lambda i, j, k: (i, j)),
        scratch_shapes=[tpu_vmem((p.bm, p.bn), jnp.float32), tpu_vmem((p.bm, p.bn), spec.raw_dtype)],
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="jaxq_qmatmul_tpu",
    )(*args)
