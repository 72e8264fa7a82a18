"""Small helpers shared by the benchmark scripts: timing, tables, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax


def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn: Callable, *args, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time in seconds of ``fn(*args)`` after ``warmup`` calls (results blocked on)."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def machine_line() -> str:
    dev = jax.devices()[0]
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}, "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
    )
