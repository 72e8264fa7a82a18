r"""AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978).

Salient input channels (large mean ``|x_k|``) are protected by scaling them up before rounding
and the activations down by the same factor, which leaves the float layer unchanged:

.. math::  y = x W = (x\,\mathrm{diag}(s)^{-1})\,(\mathrm{diag}(s)\,W) \approx
           (x / s)\, Q(\mathrm{diag}(s)\,W).

1. **Scale search.** ``s = \bar{|x|}^{\alpha}`` (clamped at ``1e-4``, normalised by
   ``\sqrt{\max s \cdot \min s}``) for ``\alpha`` on a grid in ``[0, 1)`` and, with
   ``duo_scaling``, also ``s = \bar{|x|}^{\alpha} / \bar{|\tilde w|}^{1-\alpha}`` (``\tilde w``:
   the weight normalised by its group's absmax, averaged over outputs; the weight-aware form
   of later AWQ releases); the candidate minimising the layer output error

   .. math::  L(\alpha) = \| X W - X\,\mathrm{diag}(s)^{-1} Q(\mathrm{diag}(s) W) \|_F^2
              = \operatorname{tr}(D^\top H D), \quad D = W - \mathrm{diag}(s)^{-1}Q(\mathrm{diag}(s)W)

   is kept. ``\alpha = 0`` (``s = 1``) is plain round-to-nearest, so AWQ never loses to RTN on
   the calibration data. Using ``H = X^\top X`` from :class:`CalibStats` makes the loss exact
   without storing activations.
2. **Clip search.** On the scaled weight, each scale group's range is shrunk by a ratio in
   ``[1 - max_shrink, 1]`` chosen to minimise that group's output error ``d^\top H_{gg} d``
   (``H_{gg}``: the group's diagonal block of ``H``, as the reference ``auto_clip``).

**Contract (where ``1/s`` goes).** The returned ``q`` represents ``diag(s) W``, *not* ``W``. The
layer only computes ``x W`` if its input is divided by ``s`` first: ``y = (x / s) @ q``. Fold
``1/s`` into the op that produces ``x`` — an RMSNorm/LayerNorm scale (``gamma / s``, and its
bias), or the output columns of a preceding linear map (``W_prev[:, k] / s_k``, e.g. ``v_proj`` for
``o_proj``, ``up_proj`` for ``down_proj``) — or divide ``x`` explicitly. Under grouped-query
attention several ``o_proj`` inputs come from one ``v_proj`` column: pass ``tie`` so they share
a scale and the fold stays exact. For several Dense layers reading the same input (q/k/v,
gate/up) pass them together so they share one ``s`` (the search then minimises their summed
output error). :mod:`jaxq.algorithms.sequential` does all of this for whole models.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.algorithms import _common as C
from jaxq.algorithms.grid import Grid
from jaxq.algorithms.stats import CalibStats, as_stats
from jaxq.qarray import QArray, quantize_array
from jaxq.spec import QuantSpec, as_spec


class AWQResult(NamedTuple):
    """AWQ output.

    Attributes:
      q: the quantized *scaled* kernel ``diag(s) W`` (a tuple of QArrays when several kernels
        were passed).
      input_scale: ``s [K]``; the layer's input must be divided by it (see module docstring).
      alpha: the chosen exponent.
      loss: output error ``tr(D^T H D)`` of the result (after clipping), with ``H = X^T X / n``.
      rtn_loss: the same for plain round-to-nearest, for reference.
      duo: whether the chosen scale is the weight-aware (duo) form.
    """

    q: QArray | tuple[QArray, ...]
    input_scale: jax.Array
    alpha: jax.Array
    loss: jax.Array
    rtn_loss: jax.Array
    duo: jax.Array | bool = False


def awq_scales(
    mean_abs: jax.Array,
    alpha: jax.Array | float,
    tie: jax.Array | None = None,
    slots: int = 0,
    w_mean: jax.Array | None = None,
) -> jax.Array:
    """``s = mean|x|^alpha`` (or ``mean|x|^alpha / w_mean^(1-alpha)`` with ``w_mean``), clamped at
    1e-4, normalised to ``max(s) * min(s) = 1``; dead channels get 1.

    With a ``tie`` map (channel -> slot, ``slots`` slots) channels of one slot share a scale,
    computed from their mean statistics; the result is still per channel ``[K]``.
    """
    m = C.tie_reduce(mean_abs, tie, slots, "mean")
    live = m > 0
    s = jnp.where(live, m, 1.0) ** alpha
    if w_mean is not None:
        s = s / (C.tie_reduce(w_mean, tie, slots, "mean") ** (1.0 - alpha) + 1e-4)
    s = jnp.maximum(s, 1e-4)
    s = jnp.where(live, s, 1.0)
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    return s if tie is None else s[tie]


def _clip_search(
    w: jax.Array, h: jax.Array, grid: Grid, layout: C.Layout, n_grid: int, max_shrink: float
) -> tuple[jax.Array, jax.Array | None]:
    """Per-scale-group clip ratio minimising ``d^T H_gg d``; returns keep-dims scale and zero point."""
    n = w.shape[1]
    wg = w.reshape(layout.groups, layout.group_size, n)
    hb = C.block_diag(h, layout.groups, layout.group_size)  # [G, g, g]
    lo0, hi0 = C.base_range(wg, grid, layout.per_tensor)

    def err(r):
        s, z = C.grid_scale(lo0 * r, hi0 * r, grid)
        d = wg - C.fake_quant_grouped(wg, s, z, grid)
        e = jnp.einsum("gin,gij,gjn->gn", d, hb, d, precision=jax.lax.Precision.HIGHEST)[:, None, :]
        return jnp.sum(e, keepdims=True) if layout.per_tensor else e

    ratios = 1.0 - max_shrink * jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def body(i, c):
        best_e, best_r = c
        e = err(ratios[i])
        better = e < best_e
        return jnp.where(better, e, best_e), jnp.where(better, ratios[i], best_r)

    e1 = err(1.0)
    _, best = jax.lax.fori_loop(1, n_grid, body, (e1, jnp.ones_like(e1)))
    return C.grid_scale(lo0 * best, hi0 * best, grid)


def weight_mean(w: jax.Array, layout: C.Layout) -> jax.Array:
    """Per input channel mean of ``|w|`` normalised by its scale group's absmax: ``[K]``."""
    a = jnp.abs(w).reshape(layout.groups, layout.group_size, -1)
    a = a / jnp.maximum(jnp.max(a, axis=1, keepdims=True), 1e-12)
    return jnp.mean(a, axis=2).reshape(-1)


def _output_error(h: jax.Array, x: jax.Array | None):
    """``d -> ||X D||^2 / T``: straight from the rows when there are fewer rows than channels,
    else through ``H``."""

    def err(d):
        if x is None:
            return C.quadratic_error(d, h)
        xd = jnp.dot(x, d, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(xd * xd) / x.shape[0]

    return err


# The scale search and the final rounding are separate executables: the sequential driver runs
# the search on the float block and the rounding (with its clip search) later, so each compiles
# only what it runs.
@partial(jax.jit, static_argnames=("layout", "n_grid", "slots", "duo"))
def _search(w, xtx, abs_sum, count, x, tie, grid: Grid, *, layout: C.Layout, n_grid: int, slots: int, duo: bool):
    w = w.astype(jnp.float32)
    n = jnp.maximum(count, 1.0)
    out_err = _output_error(xtx.astype(jnp.float32) / n, x)
    mean_abs = abs_sum / n
    w_mean = weight_mean(w, layout)

    def scales_for(alpha, use_w):
        return jnp.where(use_w, awq_scales(mean_abs, alpha, tie, slots, w_mean), awq_scales(mean_abs, alpha, tie, slots))

    def loss_for(cand):
        alpha, use_w = cand
        s = scales_for(alpha, use_w)
        wq = C.rtn_fake_quant(w * s[:, None], grid, layout) / s[:, None]
        return out_err(w - wq)

    alpha_grid = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    alphas = jnp.concatenate([alpha_grid, alpha_grid]) if duo else alpha_grid
    use_ws = jnp.arange(alphas.shape[0]) >= n_grid
    losses = jax.lax.map(loss_for, (alphas, use_ws))
    best = jnp.argmin(losses)  # alpha = 0 of the plain form first: ties keep plain RTN
    return scales_for(alphas[best], use_ws[best]), alphas[best], losses[best], losses[0], use_ws[best]


@partial(jax.jit, static_argnames=("layout", "clip_grid", "max_shrink", "clip"))
def _round(w, xtx, count, x, s, grid: Grid, *, layout: C.Layout, clip_grid: int, max_shrink: float, clip: bool):
    """Rounds ``diag(s) W`` (after the clip search); returns values, scale, zero point, loss, and
    the loss before clipping."""
    w = w.astype(jnp.float32)
    h = xtx.astype(jnp.float32) / jnp.maximum(count, 1.0)
    out_err = _output_error(h, x)
    ws = w * s[:, None]
    wsg = ws.reshape(layout.groups, layout.group_size, -1)

    def finish(scale, zp):
        wq = C.fake_quant_grouped(wsg, scale, zp, grid).reshape(w.shape)
        return wq, out_err(w - wq / s[:, None])

    scale, zp = C.group_range(wsg, grid, layout.per_tensor)
    wq, loss = finish(scale, zp)
    unclipped = loss
    if clip:
        # The clip search sees the scaled weight and H in the scaled input basis: (x/s) H (x/s).
        # It scores groups independently (block-diagonal H), so keep it only if the full loss agrees.
        hs = h / (s[:, None] * s[None, :])
        c_scale, c_zp = _clip_search(ws, hs, grid, layout, clip_grid, max_shrink)
        c_wq, c_loss = finish(c_scale, c_zp)
        better = c_loss < loss
        scale = jnp.where(better, c_scale, scale)
        zp = None if zp is None else jnp.where(better, c_zp, zp)
        wq = jnp.where(better, c_wq, wq)
        loss = jnp.minimum(c_loss, loss)
    return wq, scale, zp, loss, unclipped


class AWQScale(NamedTuple):
    """The scale search's result: ``input_scale`` ``s [K]``, the chosen ``alpha``, whether it is the
    weight-aware (``duo``) form, and the output errors with it (``loss``) and with ``s = 1``
    (``rtn_loss``), both before any clipping."""

    input_scale: jax.Array
    alpha: jax.Array
    loss: jax.Array
    rtn_loss: jax.Array
    duo: jax.Array


def _prepare(w, calib, spec, tie, name, method):
    """Validates the inputs shared by :func:`awq_scale` and :func:`awq`."""
    spec = as_spec(spec)
    ws, many, k = C.check_kernels(w, method, name)
    stats = as_stats(calib, k, name, hessian=True)
    tie_arr, slots = C.check_tie(name, tie, k)
    rows = None
    if not isinstance(calib, CalibStats):
        flat = jnp.asarray(calib).reshape(-1, k).astype(jnp.float32)
        rows = flat if flat.shape[0] < k else None
    return spec, ws, many, k, stats, tie_arr, slots, rows


def awq_scale(
    w: jax.Array | Sequence[jax.Array],
    calib: CalibStats | jax.Array,
    spec: QuantSpec | str,
    *,
    n_grid: int = 20,
    tie: jax.Array | np.ndarray | None = None,
    duo_scaling: bool = True,
    name: str = "",
) -> AWQScale:
    """AWQ's scale search alone (step 1 of the module docstring): the input scale ``s`` to fold.

    Takes the arguments of :func:`awq`. The sequential driver folds ``s`` into the block first
    and rounds later, on statistics collected from the quantized prefix of the block.
    """
    spec, ws, _, k, stats, tie_arr, slots, rows = _prepare(w, calib, spec, tie, name, "awq")
    if spec.fmt.kind in ("cast", "none"):
        return _unit_scale(k)
    cat, _ = C.concat_kernels(ws)
    layout = C.weight_layout(spec, cat.shape, name)
    return _find_scale(cat, stats, rows, tie_arr, slots, Grid.of(spec), layout, n_grid, duo_scaling)


def _unit_scale(k: int) -> AWQScale:
    one, z = jnp.ones((k,), jnp.float32), jnp.zeros((), jnp.float32)
    return AWQScale(one, z, z, z, jnp.asarray(False))


def _find_scale(cat, stats, rows, tie, slots, grid, layout, n_grid, duo_scaling) -> AWQScale:
    return AWQScale(*_search(
        cat, stats.xtx, stats.abs_sum, stats.count, rows, tie, grid,
        layout=layout, n_grid=max(int(n_grid), 1), slots=slots, duo=bool(duo_scaling) and int(n_grid) > 1,
    ))


def awq(
    w: jax.Array | Sequence[jax.Array],
    calib: CalibStats | jax.Array,
    spec: QuantSpec | str,
    *,
    n_grid: int = 20,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    tie: jax.Array | np.ndarray | None = None,
    duo_scaling: bool = True,
    name: str = "",
) -> AWQResult:
    """Quantizes a Dense kernel ``w [K, N]`` (or several kernels sharing one input) with AWQ.

    Args:
      w: a kernel ``[K, N]`` or a sequence of kernels ``[K, N_i]`` that read the same input.
      calib: :class:`CalibStats` with the Hessian, or raw layer inputs ``[..., K]``. Losses
        cost ``O(K^2 N)`` per candidate from statistics; raw inputs with fewer rows ``T < K``
        are used directly (``O(T K N)``), which is faster for wide layers.
      spec: the weight spec (per-tensor, per-channel or per-group over the input axis).
      n_grid: number of ``alpha`` values ``0, 1/n, ..., (n-1)/n``.
      clip: run the clip-ratio search after scaling.
      clip_grid, max_shrink: ratios ``1 - max_shrink * i / clip_grid``, ``i < clip_grid``.
      tie: optional ``[K]`` map channel -> slot: channels of one slot get one scale (e.g. the
        ``o_proj`` inputs fed by one ``v_proj`` column under grouped-query attention, so that
        ``1/s`` can still be folded into ``v_proj``).
      duo_scaling: also search the weight-aware scales ``mean|x|^a / mean|w~|^(1-a)`` (twice the
        candidates; the best of both forms is kept, so it never does worse on the calibration data).
      name: layer name for error messages.

    Returns:
      :class:`AWQResult`; ``q`` quantizes ``diag(s) @ w`` — divide the layer input by
      ``input_scale`` (or fold ``1/s`` into the previous op) before using it.
    """
    spec, ws, many, k, stats, tie_arr, slots, rows = _prepare(w, calib, spec, tie, name, "awq")
    if spec.fmt.kind in ("cast", "none"):
        qs = tuple(quantize_array(wi, spec, where=name) for wi in ws)
        unit = _unit_scale(k)
        return AWQResult(qs if many else qs[0], unit.input_scale, unit.alpha, unit.loss, unit.rtn_loss, False)
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")
    cat, splits = C.concat_kernels(ws)
    layout = C.weight_layout(spec, cat.shape, name)
    grid = Grid.of(spec)
    if int(n_grid) > 1:
        found = _find_scale(cat, stats, rows, tie_arr, slots, grid, layout, n_grid, duo_scaling)
    else:  # s = 1: plain rounding (plus the clip search), e.g. on an already scaled kernel
        found = _unit_scale(k)
    wq, scale, zp, loss, unclipped = _round(
        cat, stats.xtx, stats.count, rows, found.input_scale, grid, layout=layout,
        clip_grid=int(clip_grid), max_shrink=float(max_shrink), clip=bool(clip),
    )
    rtn_loss = found.rtn_loss if int(n_grid) > 1 else unclipped
    qs = C.split_to_qarrays(wq, scale, zp, spec, splits)
    return AWQResult(qs if many else qs[0], found.input_scale, found.alpha, loss, rtn_loss, found.duo)
