r"""GPTQ: Hessian-aware rounding with error compensation (Frantar et al., 2022, arXiv:2210.17323).

For a Dense kernel ``W [K, N]`` and layer inputs ``X [T, K]``, GPTQ minimises the output error

.. math::  \| X W - X \hat W \|_F^2 = \operatorname{tr}\big((W-\hat W)^\top H (W-\hat W)\big),
           \qquad H = X^\top X,

one input row at a time (Optimal Brain Quantization). After row ``i`` is rounded to ``q_i``,
the not-yet-quantized rows ``j > i`` absorb its error:

.. math::  e_i = (w_i - q_i) / U_{ii}, \qquad w_j \leftarrow w_j - U_{ij}\, e_i,

where ``U`` is the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^\top U``), so the
sequential updates need no re-inversion. Implementation details follow the reference code:

* **damping** ``H += \lambda I`` with ``\lambda = percdamp \cdot mean(diag H)`` (retried x10
  if the Cholesky factorisation fails);
* **dead inputs** (``H_ii = 0``: a channel that is always zero) get ``H_ii = 1`` and a zero row;
* **act_order**: rows are processed by decreasing ``H_ii`` (the most sensitive first);
* **lazy batch updates**: the update of rows outside the current block of ``block_size`` rows is
  deferred and applied as one matmul per block, ``W_{rest} -= U_{blk,rest}^\top E_{blk}``;
* **groups**: with ``per_group`` specs each group's scale is computed when the group's first
  row is reached, from the error-updated rows. With ``act_order`` the groups are *static*
  (computed once on the original ``W`` before any update) so that each group is still a
  contiguous range of input rows, which is what a :class:`~jaxq.QArray` can store.

Everything runs in float32 under ``jax.lax`` loops and jits; the spec (any scaled format:
int8/int4/int3, nf4, fp8; per-tensor/-channel/-group; symmetric or not) enters as a static
layout plus a :class:`~jaxq.algorithms.grid.Grid` whose int code range is data, so one
compilation per kernel shape serves every int bit width.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxq.algorithms import _common as C
from jaxq.algorithms.grid import Grid
from jaxq.algorithms.stats import CalibStats, as_stats
from jaxq.qarray import QArray, quantize_array
from jaxq.spec import QuantSpec, as_spec


class GPTQResult(NamedTuple):
    """``q``: the quantized kernel (a tuple for several kernels); ``loss``: GPTQ's error proxy
    ``sum_i ||w_i - q_i||^2 / (2 U_ii^2)``."""

    q: QArray | tuple[QArray, ...]
    loss: jax.Array


def inverse_cholesky(h: jax.Array, percdamp: float, max_tries: int = 6) -> jax.Array:
    """Upper Cholesky factor ``U`` of ``(H + \\lambda I)^{-1}`` (``= U^T U``), in float32.

    Computed without forming the inverse: with ``J`` the row-reversal permutation and
    ``J H J = L L^T``, ``H = R R^T`` for the upper-triangular ``R = J L J``, hence
    ``H^{-1} = R^{-T} R^{-1}`` and ``U = R^{-1}`` (one triangular solve). By uniqueness of the
    Cholesky factor this equals the reference ``cholesky(cholesky_inverse(cholesky(H)), upper)``.

    ``\\lambda = percdamp * mean(diag H)``; if the factorisation yields non-finite values the
    damping is multiplied by 10 and retried (at most ``max_tries`` times).
    """
    h = h.astype(jnp.float32)
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    base = jnp.maximum(jnp.mean(jnp.diag(h)), 1e-8)

    def factor(damp):
        lo = jnp.linalg.cholesky((h + damp * eye)[::-1, ::-1])
        return jax.scipy.linalg.solve_triangular(lo[::-1, ::-1], eye, lower=False)

    def cond(c):
        i, _, u = c
        return (i == 0) | ((i < max_tries) & ~jnp.all(jnp.isfinite(u)))

    def body(c):
        i, damp, _ = c
        damp = jnp.where(i == 0, damp, damp * 10.0)
        return i + 1, damp, factor(damp)

    d0 = jnp.asarray(percdamp * base, jnp.float32)
    nan = jnp.full((k, k), jnp.nan, jnp.float32)
    _, _, u = jax.lax.while_loop(cond, body, (jnp.int32(0), d0, nan))  # one traced copy of `factor`
    return u



@jax.jit
def float_target(w: jax.Array, h: jax.Array, cross: jax.Array, percdamp: float = 0.01) -> jax.Array:
    r"""The weight whose output on the quantized model's inputs best matches the float layer.

    With ``X`` the layer's inputs in the (partly) quantized model and ``X_f`` those in the float
    model, ``min_Q ||X_f W - X Q||^2 = ||X_f W - X W*||^2 + ||X (W* - Q)||^2`` for the
    least-squares ``W*``, so GPTQ on ``W*`` with ``H = X^T X / n`` minimises the error against the
    *float* output (asymmetric calibration). Ridge-regularised toward ``W``:

    .. math::  W^* = (H + \lambda I)^{-1} (C W + \lambda W), \quad C = X^\top X_f / n,
               \quad \lambda = \text{percdamp} \cdot \overline{\operatorname{diag} H},

    so an input channel with no data (a dead channel) keeps its row of ``W``.
    """
    w = w.astype(jnp.float32)
    lam = percdamp * jnp.maximum(jnp.mean(jnp.diag(h)), 1e-8)
    a = h.astype(jnp.float32) + lam * jnp.eye(h.shape[0], dtype=jnp.float32)
    rhs = jnp.dot(cross.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST) + lam * w
    return jax.scipy.linalg.solve(a, rhs, assume_a="pos")

def _block_size(block_size: int, layout: C.Layout) -> int:
    """A block size whose boundaries are compatible with the groups (each group within a block or
    starting on a block boundary)."""
    if layout.groups == 1:
        return block_size
    g = layout.group_size
    if block_size % g == 0 or g % block_size == 0:
        return block_size
    return math.gcd(block_size, g)


@partial(jax.jit, static_argnames=("layout", "block_size", "act_order", "static_groups"))
def _gptq(
    w: jax.Array,
    xtx: jax.Array,
    count: jax.Array,
    grid: Grid,
    *,
    layout: C.Layout,
    block_size: int,
    percdamp: float,
    act_order: bool,
    static_groups: bool,
):
    k, n = w.shape
    groups, g = layout.groups, layout.group_size
    grouped = groups > 1

    w = w.astype(jnp.float32)
    h = xtx.astype(jnp.float32) / jnp.maximum(count, 1.0)
    diag = jnp.diag(h)
    dead = diag <= 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[:, None], 0.0, w)

    # Scales fixed up front: per-tensor, per-channel, and static groups (original row order).
    if not grouped or static_groups:
        scale0, zp0 = C.group_range(w.reshape(groups, g, n), grid, layout.per_tensor)
        scale0 = jnp.broadcast_to(scale0, (groups, 1, n))
        zp0 = None if zp0 is None else jnp.broadcast_to(zp0, (groups, 1, n))
    else:
        scale0 = jnp.ones((groups, 1, n), jnp.float32)
        zp0 = None if grid.symmetric else jnp.zeros((groups, 1, n), jnp.float32)

    if act_order:
        perm = jnp.argsort(-jnp.diag(h), stable=True)
    else:
        perm = jnp.arange(k)
    w = w[perm]
    h = h[perm][:, perm]
    u = inverse_cholesky(h, percdamp)

    bs = _block_size(block_size, layout)
    kp = -(-k // bs) * bs
    pad = kp - k
    if pad:  # padded rows: zero weight, identity Hessian block -> no interaction
        w = jnp.pad(w, ((0, pad), (0, 0)))
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.concatenate([jnp.zeros(k), jnp.ones(pad)]))
    row_group = jnp.pad(perm // g, (0, pad))  # group of each processed row (original order)
    nblocks = kp // bs
    rows = jnp.arange(kp)

    def find_params(wrows):
        s, z = C.group_range(wrows[None], grid, layout.per_tensor)
        return s[0], (None if z is None else z[0])

    def quant_row(wrow, s, z):
        return C.fake_quant_grouped(wrow[None], s, z, grid)[0]

    def block_body(b, carry):
        w, qw, loss, scales, zps = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w, (i1, 0), (bs, n))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
        if grouped and not static_groups and g > bs:
            # Groups span whole blocks: a group starts here iff i1 % g == 0; W is fully updated now.
            def new_group(sz):
                s, z = find_params(jax.lax.dynamic_slice(w, (i1, 0), (g, n)))
                gi = i1 // g
                sc, zc = sz
                sc = sc.at[gi].set(s)
                zc = None if zc is None else zc.at[gi].set(z)
                return sc, zc

            scales, zps = jax.lax.cond(i1 % g == 0, new_group, lambda sz: sz, (scales, zps))

        def row_body(i, c):
            w1, q1, e1, loss, scales, zps = c
            j = i1 + i
            if grouped and not static_groups and g <= bs:

                def new_group(sz):
                    s, z = find_params(jax.lax.dynamic_slice(w1, (i, 0), (g, n)))
                    gi = j // g
                    sc, zc = sz
                    sc = sc.at[gi].set(s)
                    zc = None if zc is None else zc.at[gi].set(z)
                    return sc, zc

                scales, zps = jax.lax.cond(j % g == 0, new_group, lambda sz: sz, (scales, zps))
            gi = jnp.minimum(row_group[j], groups - 1)
            s = scales[gi]
            z = None if zps is None else zps[gi]
            wrow = w1[i]
            d = u1[i, i]
            q = quant_row(wrow, s, z)
            q = jnp.where(j < k, q, 0.0)
            err = (wrow - q) / d
            w1 = w1 - u1[i][:, None] * err[None, :]  # U is upper triangular: rows < i untouched
            w1 = w1.at[i].set(q)
            q1 = q1.at[i].set(q)
            e1 = e1.at[i].set(err)
            loss = loss + jnp.sum((wrow - q) ** 2) / (2 * d * d)
            return w1, q1, e1, loss, scales, zps

        zeros = jnp.zeros((bs, n), jnp.float32)
        w1, q1, e1, loss, scales, zps = jax.lax.fori_loop(
            0, bs, row_body, (w1, zeros, zeros, loss, scales, zps)
        )
        qw = jax.lax.dynamic_update_slice(qw, q1, (i1, 0))
        # Lazy batch update of all later rows: W[i2:] -= U[i1:i2, i2:]^T E1.
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (bs, kp))
        u_rows = jnp.where(rows[None, :] >= i1 + bs, u_rows, 0.0)
        w = w - jnp.dot(u_rows.T, e1, precision=jax.lax.Precision.HIGHEST)
        w = jax.lax.dynamic_update_slice(w, w1, (i1, 0))
        return w, qw, loss, scales, zps

    init = (w, jnp.zeros((kp, n), jnp.float32), jnp.zeros((), jnp.float32), scale0, zp0)
    _, qw, loss, scales, zps = jax.lax.fori_loop(0, nblocks, block_body, init)
    qw = jnp.zeros((k, n), jnp.float32).at[perm].set(qw[:k])
    if layout.per_tensor:
        scales = scales[:1, :, :1]
        zps = None if zps is None else zps[:1, :, :1]
    return qw, scales, zps, loss


def gptq(
    w: jax.Array | Sequence[jax.Array],
    calib: CalibStats | jax.Array,
    spec: QuantSpec | str,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    static_groups: bool | None = None,
    name: str = "",
) -> GPTQResult:
    """Quantizes a Dense kernel ``w [K, N]`` (or several reading the same input) with GPTQ.

    Args:
      w: the float kernel (``y = x @ w``), or a sequence of kernels ``[K, N_i]`` that read the
        same input (q/k/v). Those are quantized jointly as one ``[K, sum N_i]`` matrix, which
        gives exactly the per-kernel results (GPTQ treats output columns independently and the
        row order depends on ``H`` only) with one Hessian factorisation and one row loop.
      calib: :class:`CalibStats` with the Hessian (``init_stats(K, hessian=True)``), or raw
        layer inputs ``[..., K]``.
      spec: the weight spec (e.g. ``"int4-g128"``); per-tensor, per-channel (output axis) or
        per-group (input axis) tilings are supported.
      block_size: rows per lazy-update block (128 as in the paper).
      percdamp: damping as a fraction of the mean Hessian diagonal.
      act_order: process rows by decreasing ``H_ii``.
      static_groups: compute group scales once on the original weight. Defaults to
        ``act_order``; ``act_order=True`` with ``static_groups=False`` is rejected for per-group
        specs because the groups would no longer be contiguous rows.
      name: the layer's name for error messages.

    Returns:
      :class:`GPTQResult` with the :class:`~jaxq.QArray` (logical dtype of ``w``; a tuple for
      a sequence of kernels) and the loss (summed over kernels).
    """
    spec = as_spec(spec)
    ws, many, k = C.check_kernels(w, "gptq", name)
    stats = as_stats(calib, k, name, hessian=True)
    if spec.fmt.kind in ("cast", "none"):
        qs = tuple(quantize_array(wi, spec, where=name) for wi in ws)
        return GPTQResult(qs if many else qs[0], jnp.zeros((), jnp.float32))
    layouts = [C.weight_layout(spec, wi.shape, name) for wi in ws]
    if static_groups is None:
        static_groups = act_order
    if act_order and layouts[0].groups > 1 and not static_groups:
        raise ValueError(
            f"{name or 'layer'}: act_order with dynamic groups makes groups non-contiguous, which a "
            "QArray cannot store; use static_groups=True (the default with act_order)"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    opts = dict(
        block_size=int(block_size),
        percdamp=float(percdamp),
        act_order=bool(act_order),
        static_groups=bool(static_groups),
    )
    if many and layouts[0].per_tensor:  # one scale per kernel: cannot share a joint matrix
        res = [gptq(wi, stats, spec, block_size=block_size, percdamp=percdamp, act_order=act_order,
                    static_groups=static_groups, name=name) for wi in ws]
        return GPTQResult(tuple(r.q for r in res), sum(r.loss for r in res))
    cat, splits = C.concat_kernels(ws)
    # The layout depends on K only, so every kernel's (validated above) is the joint matrix's.
    qw, scales, zps, loss = _gptq(cat, stats.xtx, stats.count, Grid.of(spec), layout=layouts[0], **opts)
    qs = C.split_to_qarrays(qw, scales, zps, spec, splits)
    return GPTQResult(qs if many else qs[0], loss)
