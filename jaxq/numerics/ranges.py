"""Range selection: which real interval ``[lo, hi]`` each scale group should cover.

All functions take a tensor in grouped form and the axes that share a scale, and
return keep-dims ``(lo, hi)``. They are pure and jit-able.

* ``absmax`` / ``minmax`` cover every value (no clipping error, most rounding error);
* ``percentile`` clips rare outliers;
* ``mse`` searches a clip ratio per group that minimises the round-trip squared error.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from jaxq.numerics import codec
from jaxq.numerics.formats import Format

RangeMethod = Literal["absmax", "minmax", "percentile", "mse"]
RANGE_METHODS: tuple[str, ...] = ("absmax", "minmax", "percentile", "mse")


def minmax(xg: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    x = xg.astype(jnp.float32)
    return jnp.min(x, axis=tuple(axes), keepdims=True), jnp.max(x, axis=tuple(axes), keepdims=True)


def absmax(xg: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    m = jnp.max(jnp.abs(xg.astype(jnp.float32)), axis=tuple(axes), keepdims=True)
    return -m, m


def percentile(
    xg: jax.Array, axes: Sequence[int], q: float, symmetric: bool
) -> tuple[jax.Array, jax.Array]:
    """Clips at the ``q``-th percentile of ``|x|`` (symmetric) or of ``x`` at both ends."""
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    x = xg.astype(jnp.float32)
    if symmetric:
        m = jnp.percentile(jnp.abs(x), q, axis=tuple(axes), keepdims=True)
        return -m, m
    lo = jnp.percentile(x, 100.0 - q, axis=tuple(axes), keepdims=True)
    hi = jnp.percentile(x, q, axis=tuple(axes), keepdims=True)
    return lo, hi


def mse_search(
    xg: jax.Array,
    axes: Sequence[int],
    fmt: Format,
    symmetric: bool,
    num_candidates: int = 32,
    min_ratio: float = 0.3,
    full_range: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Per-group clip ratio in ``[min_ratio, 1]`` that minimises ``||x - fq(x)||^2``.

    Starts from the min/max range and shrinks it; the full range (ratio 1) is a
    candidate, so the result is never worse than absmax/minmax. Runs as a
    ``fori_loop`` so memory stays at a few copies of ``x`` whatever the number of
    candidates.
    """
    x = xg.astype(jnp.float32)
    lo0, hi0 = absmax(x, axes) if symmetric else minmax(x, axes)

    def err(r):
        d = x - codec.fake_quantize(x, lo0 * r, hi0 * r, fmt, symmetric, full_range)
        return jnp.sum(d * d, axis=tuple(axes), keepdims=True)

    ratios = jnp.linspace(1.0, min_ratio, num_candidates)

    def body(i, carry):
        best_err, best_r = carry
        r = ratios[i]
        e = err(r)
        better = e < best_err
        return jnp.where(better, e, best_err), jnp.where(better, r, best_r)

    init = (err(1.0), jnp.ones_like(lo0))
    _, best = jax.lax.fori_loop(1, num_candidates, body, init)
    return lo0 * best, hi0 * best


def select_range(
    xg: jax.Array,
    axes: Sequence[int],
    method: str,
    fmt: Format,
    symmetric: bool,
    percentile_q: float = 99.9,
    full_range: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Dispatches to a range method by name (``full_range`` only matters to the MSE search)."""
    if method == "absmax":
        return absmax(xg, axes) if symmetric else minmax(xg, axes)
    if method == "minmax":
        return minmax(xg, axes)
    if method == "percentile":
        return percentile(xg, axes, percentile_q, symmetric)
    if method == "mse":
        return mse_search(xg, axes, fmt, symmetric, full_range=full_range)
    raise ValueError(f"unknown range method {method!r}; choose one of {RANGE_METHODS}")
