"""Calibration statistics of a layer's input, accumulated batch by batch.

For inputs ``x_t in R^K`` (one row per token / pixel) the state holds

* ``xtx = sum_t x_t x_t^T``  ``[K, K]`` — the (unnormalised) Hessian of the layer's squared
  output error, ``||X W - X W'||_F^2 = tr((W - W')^T X^T X (W - W'))``; used by GPTQ, and by
  AWQ to score candidates exactly without keeping the activations;
* ``x_sum = sum_t x_t``, ``abs_sum = sum_t |x_t|`` ``[K]`` — means for bias correction and AWQ;
* ``abs_max = max_t |x_t|`` ``[K]`` — SmoothQuant's activation ranges;
* ``count`` — the (weighted) number of rows.

Everything is a pure function of a :class:`CalibStats` NamedTuple (a pytree), so updates jit,
scan over batches, and merge across devices (:func:`merge_stats`). Accumulation is float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.algorithms._common import check_channels


class CalibStats(NamedTuple):
    """Running statistics of one layer input with ``K`` channels (see module docstring).

    ``xtx`` is ``None`` when the Hessian was not requested (it costs ``K^2`` floats).
    """

    xtx: jax.Array | None
    x_sum: jax.Array
    abs_sum: jax.Array
    abs_max: jax.Array
    count: jax.Array

    @property
    def channels(self) -> int:
        return int(self.x_sum.shape[-1])

    @property
    def mean(self) -> jax.Array:
        """``E[x]`` per channel ``[K]`` (0 before any data)."""
        return self.x_sum / jnp.maximum(self.count, 1.0)

    @property
    def mean_abs(self) -> jax.Array:
        """``E|x|`` per channel ``[K]``."""
        return self.abs_sum / jnp.maximum(self.count, 1.0)

    @property
    def hessian(self) -> jax.Array:
        """``H = X^T X / n`` ``[K, K]`` (the scale does not matter to the algorithms)."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the Hessian; use init_stats(k, hessian=True)")
        return self.xtx / jnp.maximum(self.count, 1.0)


def init_stats(k: int, hessian: bool = True) -> CalibStats:
    """Empty statistics for a layer with ``k`` input channels."""
    z = jnp.zeros((k,), jnp.float32)
    return CalibStats(
        xtx=jnp.zeros((k, k), jnp.float32) if hessian else None,
        x_sum=z,
        abs_sum=z,
        abs_max=z,
        count=jnp.zeros((), jnp.float32),
    )


def update_stats(
    stats: CalibStats, x: jax.Array, weights: jax.Array | None = None, *, name: str = ""
) -> CalibStats:
    """Adds a batch ``x [..., K]`` of layer inputs; every leading index is one row.

    Args:
      stats: the running state.
      x: activations; the last axis must have ``K`` channels.
      weights: optional ``x.shape[:-1]`` row weights (e.g. a 0/1 padding mask). Rows with weight
        0 are ignored, also by ``abs_max``.
      name: layer name for error messages.

    Shapes are checked here, then a jitted core runs (works under an outer ``jit`` too).
    """
    check_channels(name, x.shape, stats.channels)
    if weights is not None and tuple(weights.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"row weights for {name or 'layer'} have shape {tuple(weights.shape)}; "
            f"expected {tuple(x.shape[:-1])} (the activations' leading axes)"
        )
    return _update(stats, x, weights)


@jax.jit
def _update(stats: CalibStats, x: jax.Array, weights: jax.Array | None) -> CalibStats:
    k = stats.channels
    x2 = x.reshape(-1, k).astype(jnp.float32)
    if weights is None:
        w = jnp.ones((x2.shape[0],), jnp.float32)
    else:
        w = weights.reshape(-1).astype(jnp.float32)
    xw = x2 * w[:, None]
    xtx = stats.xtx
    if xtx is not None:
        xtx = xtx + jnp.dot(xw.T, x2, precision=jax.lax.Precision.HIGHEST)
    seen = jnp.where(w[:, None] > 0, jnp.abs(x2), 0.0)
    return CalibStats(
        xtx=xtx,
        x_sum=stats.x_sum + jnp.sum(xw, axis=0),
        abs_sum=stats.abs_sum + jnp.sum(jnp.abs(xw), axis=0),
        abs_max=jnp.maximum(stats.abs_max, jnp.max(seen, axis=0, initial=0.0)),
        count=stats.count + jnp.sum(w),
    )


def compute_stats(x: jax.Array, hessian: bool = True, *, name: str = "") -> CalibStats:
    """Statistics of one array of activations ``[..., K]``."""
    if getattr(x, "ndim", 0) < 1:
        raise ValueError(f"calibration activations for {name or 'layer'} must be an array [..., K]")
    return update_stats(init_stats(int(x.shape[-1]), hessian), x, name=name)


def merge_stats(a: CalibStats, b: CalibStats) -> CalibStats:
    """Combines statistics of disjoint data (e.g. from two devices or two runs)."""
    if a.channels != b.channels:
        raise ValueError(f"cannot merge statistics with K={a.channels} and K={b.channels}")
    if (a.xtx is None) != (b.xtx is None):
        raise ValueError("cannot merge statistics with and without the Hessian")
    return CalibStats(
        xtx=None if a.xtx is None else a.xtx + b.xtx,
        x_sum=a.x_sum + b.x_sum,
        abs_sum=a.abs_sum + b.abs_sum,
        abs_max=jnp.maximum(a.abs_max, b.abs_max),
        count=a.count + b.count,
    )


def as_stats(calib: "CalibStats | jax.Array", k: int, name: str = "", hessian: bool = True) -> CalibStats:
    """Accepts statistics or raw activations ``[..., K]`` and checks the channel count ``k``."""
    if isinstance(calib, CalibStats):
        if calib.channels != k:
            raise ValueError(
                f"calibration activations for {name or 'layer'} have shape (..., {calib.channels}); "
                f"expected (..., K={k}) to match the weight's input dimension K={k}"
            )
        if hessian and calib.xtx is None:
            raise ValueError(
                f"calibration statistics for {name or 'layer'} lack the Hessian X^T X that this "
                "algorithm needs; collect them with init_stats(k, hessian=True)"
            )
        return calib
    shape = tuple(getattr(calib, "shape", ()))
    check_channels(name, shape, k)
    return compute_stats(calib, hessian=hessian, name=name)


def scale_stats(stats: CalibStats, s: jax.Array) -> CalibStats:
    """Statistics of ``x / s`` from those of ``x`` (exact): what a layer sees after AWQ or
    SmoothQuant folded ``1/s`` into the op before it.

    ``xtx -> xtx / (s s^T)``, ``x_sum, abs_sum, abs_max -> / s`` (``s > 0``).
    """
    s = s.astype(jnp.float32)
    return CalibStats(
        xtx=None if stats.xtx is None else stats.xtx / (s[:, None] * s[None, :]),
        x_sum=stats.x_sum / s,
        abs_sum=stats.abs_sum / s,
        abs_max=stats.abs_max / s,
        count=stats.count,
    )


@jax.jit
def update_cross_moment(acc: jax.Array, x: jax.Array, x_ref: jax.Array) -> jax.Array:
    """``acc + X^T X_ref`` for two captures ``[..., K]`` of one layer input over the same rows
    (e.g. the quantized and the float model's), in float32."""
    k = acc.shape[0]
    a, b = x.reshape(-1, k).astype(jnp.float32), x_ref.reshape(-1, k).astype(jnp.float32)
    return acc + jnp.dot(a.T, b, precision=jax.lax.Precision.HIGHEST)
