"""Quantized matmul speed: XLA baselines vs jaxq's Pallas kernels vs auto-dispatch (vs Qwix).

For every M in {1, 16, 128, 2048, 8192} and N = K in {4096, 8192} this times

* ``xla bf16``  - ``x @ w`` in bf16 (the baseline every ratio refers to);
* ``xla int8``  - a bare ``int8 x int8 -> int32`` dot_general (the hardware ceiling for W8A8 in XLA);
* ``w8a8`` (int8 per-channel weights, dynamic per-token int8 activations),
  ``w8a16`` (int8 per-channel) and ``w4a16`` (int4, groups of 128), each through
  the public op ``jaxq.ops.qmatmul`` three ways: ``impl="xla"``, the kernel forced
  (``"pallas"``; ``"interpret"`` on CPU with ``--quick``), and ``impl=None`` (auto);
* the same three recipes with Qwix, when it is importable.

Times are medians over rounds of back-to-back calls (after compile and warm-up),
each round ended by ``block_until_ready``. Throughput is TFLOP/s (2MNK / t), and
for decode shapes (M <= 16, memory-bound) TB/s of weight + activation + output bytes.
``x bf16`` is ``t(xla bf16) / t``: above 1 is faster than bf16.

Usage::

    PYTHONPATH=. python benchmarks/kernels.py [--quick] [--json out.json] [--ms 1,16] [--sizes 4096]

``--json`` also lists the cells where the forced kernel beat ``qmatmul``'s XLA path:
those are the candidates for ``jaxq.kernels.block_tables.KERNEL_WINS`` on this device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python benchmarks/kernels.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.kernels.block_tables import DECODE_MAX_M
from jaxq.ops.qmatmul import choose_impl, qmatmul
from jaxq.qarray import quantize_array
from jaxq.spec import QuantSpec

RECIPES: dict[str, tuple[QuantSpec, QuantSpec | None]] = {
    "w8a8": (QuantSpec("int8"), QuantSpec("int8", granularity="per_token")),
    "w8a16": (QuantSpec("int8"), None),
    "w4a16": (QuantSpec("int4", granularity="per_group", group_size=128), None),
}


def time_fn(fn: Callable, *args: Any, rounds: int = 7, target_s: float = 0.02) -> float:
    """Median seconds per call: compile, warm up, then rounds of n back-to-back calls.

    Back-to-back calls keep the device queue full, so the time is device time
    rather than Python dispatch latency (which dominates microsecond GEMVs).
    """
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(200, max(1, target_s / one)))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def _qwix_fns(w: jax.Array, kind: str) -> Callable | None:
    """A jitted Qwix equivalent of a recipe, or None when Qwix is missing or refuses."""
    try:
        import qwix
    except Exception:
        return None
    dn = (((1,), (0,)), ((), ()))
    if kind == "w4a16":
        qw = qwix.quantize(w, jnp.int4, channelwise_axes=[1], tiled_axes={0: 128})
    else:
        qw = qwix.quantize(w, jnp.int8, channelwise_axes=[1])
    if kind == "w8a8":
        def f(x, qw):
            return qwix.dot_general(qwix.quantize(x, jnp.int8, channelwise_axes=[0]), qw, dn).astype(x.dtype)
    else:
        def f(x, qw):
            return qwix.dot_general(x, qw, dn).astype(x.dtype)
    jf = jax.jit(f)
    return lambda x: jf(x, qw)


def bench_shape(m: int, k: int, kernel_impl: str | None, with_qwix: bool, seed: int = 0) -> list[dict]:
    """All rows for one (M, K = N) cell."""
    n = k
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    flops = 2.0 * m * n * k
    rows: list[dict] = []

    def add(variant: str, impl: str, t: float | None, w_bytes: int, note: str = "") -> None:
        moved = w_bytes + m * k * 2 + m * n * 2
        rows.append(dict(m=m, k=k, n=n, variant=variant, impl=impl, seconds=t, flops=flops, bytes=moved,
                         tflops=None if t is None else flops / t / 1e12,
                         tbps=None if t is None else moved / t / 1e12, note=note))

    add("xla bf16", "xla", time_fn(jax.jit(lambda a, b: a @ b), x, w), k * n * 2)
    xq = jnp.clip(jnp.round(x.astype(jnp.float32) * 20), -127, 127).astype(jnp.int8)
    wq = jnp.clip(jnp.round(w.astype(jnp.float32) * 1000), -127, 127).astype(jnp.int8)
    int8_dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                        preferred_element_type=jnp.int32))
    add("xla int8", "xla", time_fn(int8_dot, xq, wq), k * n)

    for kind, (wspec, act) in RECIPES.items():
        qw = quantize_array(w.astype(jnp.float32), wspec)
        jax.block_until_ready(qw.values)
        times: dict[str, float | None] = {}
        for impl in ("xla", kernel_impl):
            if impl is None:
                continue
            f = jax.jit(lambda a, q, impl=impl: qmatmul(a, q, act_spec=act, impl=impl))
            try:
                times[impl] = time_fn(f, x, qw)
                add(kind, impl, times[impl], qw.nbytes)
            except Exception as e:  # a kernel that does not lower here is a result, not a crash
                times[impl] = None
                add(kind, impl, None, qw.nbytes, note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        chosen = choose_impl(m, k, n, qw.meta, act, None)
        # Auto-dispatch compiles to the very same function as the impl it picks.
        add(kind, f"auto->{chosen}", times.get(chosen), qw.nbytes)
        if with_qwix:
            try:
                qf = _qwix_fns(w, kind)
                if qf is not None:
                    add(f"{kind} qwix", "qwix", time_fn(qf, x), qw.nbytes)
            except Exception as e:
                add(f"{kind} qwix", "qwix", None, qw.nbytes, note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        del qw
    base = rows[0]["seconds"]
    for r in rows:
        r["vs_bf16"] = None if r["seconds"] is None else base / r["seconds"]
    return rows


HEADER = ("| M | K=N | variant | impl | time (us) | TFLOP/s | TB/s | x bf16 | note |\n"
          "|---:|---:|---|---|---:|---:|---:|---:|---|")


def markdown_row(r: dict) -> str:
    t = r["seconds"]
    decode = r["m"] <= DECODE_MAX_M
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (
        f"| {r['m']} | {r['k']} | {r['variant']} | {r['impl']} | {fmt(None if t is None else t * 1e6, '.1f')} | "
        f"{fmt(r['tflops'], '.2f')} | {fmt(r['tbps'] if decode else None, '.3f')} | "
        f"{fmt(r['vs_bf16'], '.2f')} | {r['note']} |"
    )


def markdown(rows: list[dict]) -> str:
    """The whole table (rows are also streamed one cell at a time while the benchmark runs)."""
    return "\n".join([HEADER] + [markdown_row(r) for r in rows])


def kernel_wins(rows: list[dict]) -> list[dict]:
    """Cells where the forced kernel beat qmatmul's XLA path (by >= 3%, to stay clear of noise)."""
    out = []
    by_key: dict[tuple, dict[str, float | None]] = {}
    for r in rows:
        if r["variant"] in RECIPES and not r["impl"].startswith("auto"):
            by_key.setdefault((r["variant"], r["m"], r["k"]), {})[r["impl"]] = r["seconds"]
    for (kind, m, k), t in sorted(by_key.items()):
        tk = t.get("pallas")
        tx = t.get("xla")
        if tk is not None and tx is not None and tk < 0.97 * tx:
            out.append(dict(kind=kind, m=m, k=k, kernel_s=tk, xla_s=tx, speedup=tx / tk))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--sizes", default=None, help="comma-separated N = K values")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--no-qwix", action="store_true")
    ap.add_argument("--no-kernel", action="store_true", help="skip the forced-kernel rows")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} (backend {backend}, jax {jax.__version__}, {len(jax.devices())} device(s))")
    if args.quick:
        ms, sizes = [1, 16, 128], [256]
    else:
        ms, sizes = [1, 16, 128, 2048, 8192], [4096, 8192]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    if args.sizes:
        sizes = [int(v) for v in args.sizes.split(",")]
    if args.no_kernel:
        kernel_impl = None
    elif backend in ("gpu", "tpu"):
        kernel_impl = "pallas"
    elif args.quick:
        kernel_impl = "interpret"  # correctness smoke only: interpret mode is slow by nature
    else:
        kernel_impl = None
        print("note: no GPU/TPU; kernel rows skipped (use --quick to run them in interpret mode)")
    with_qwix = not args.no_qwix
    if with_qwix:
        try:
            import qwix  # noqa: F401
        except Exception:
            print("note: qwix not importable; skipping the Qwix rows")
            with_qwix = False

    def dump(rows: list[dict]) -> dict:
        out = dict(device_kind=dev.device_kind, backend=backend, jax=jax.__version__, quick=args.quick,
                   kernel_impl=kernel_impl, rows=rows, kernel_wins=kernel_wins(rows))
        if args.json:  # rewritten after every cell: a run cut off by a timeout keeps what it measured
            Path(args.json).write_text(json.dumps(out, indent=1))
        return out

    rows: list[dict] = []
    print(HEADER, flush=True)
    for k in sizes:
        for m in ms:
            t0 = time.perf_counter()
            cell = bench_shape(m, k, kernel_impl, with_qwix)
            rows += cell
            for r in cell:
                print(markdown_row(r), flush=True)
            print(f"<!-- M={m} K=N={k}: {len(cell)} rows in {time.perf_counter() - t0:.1f}s -->", flush=True)
            dump(rows)
    wins = dump(rows)["kernel_wins"]
    if kernel_impl == "pallas":
        print("\nkernel faster than qmatmul's XLA path:", wins or "nowhere (auto-dispatch keeps XLA)")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
