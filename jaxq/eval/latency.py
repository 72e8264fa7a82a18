"""Serving latency: wall time of one jitted forward pass on one batch."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax

__all__ = ["measure_latency"]


def measure_latency(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: Any,
    *,
    iters: int = 30,
    warmup: int = 3,
    jit: bool = True,
) -> dict[str, float]:
    """Times ``jax.jit(apply_fn)(params, x)`` after ``warmup`` untimed calls.

    Pass an already jitted function with ``jit=False`` to reuse its compilation.

    Each timed call is waited for with ``block_until_ready``, so the numbers are
    device time plus dispatch, not just the enqueue.

    Returns:
      ``{"median_ms", "min_ms", "mean_ms", "compile_s"}``; ``compile_s`` is the
      first call (tracing, compilation and one run; near 0 if it was compiled before).
    """
    fn = jax.jit(apply_fn) if jit else apply_fn
    x = jax.device_put(x)
    params = jax.device_put(params)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    compile_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        jax.block_until_ready(fn(params, x))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "compile_s": compile_s,
    }
