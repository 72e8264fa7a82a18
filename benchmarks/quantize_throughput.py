"""Throughput of jitted `jaxq.quantize` on a ~300M-parameter Llama-shaped float32 tree.

Compares, in one run: jaxq int8 per-channel and int4 g128; the same work through
Qwix's core quantize (`qwix.quantize`, if installed); and this machine's
memory-copy bandwidth (a jitted ``x * 1`` copy of the same tree, which reads and
writes every byte once). Reports GB/s of float input and the ratios.

    python benchmarks/quantize_throughput.py            # ~300M params
    python benchmarks/quantize_throughput.py --layers 2 # quick smoke run
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 2)[0])
import jaxq  # noqa: E402
from benchmarks.common import machine_line, markdown_table, time_fn  # noqa: E402


def llama_tree(layers: int, d: int, ffn: int, seed: int = 0) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), layers * 7))
    tree = {}
    for i in range(layers):
        shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, ffn), "up": (d, ffn), "down": (ffn, d)}
        tree[f"layer_{i}"] = {n: {"kernel": jax.random.normal(next(keys), s, jnp.float32) * 0.02} for n, s in shapes.items()}
        tree[f"layer_{i}"]["norm"] = {"scale": jnp.ones((d,), jnp.float32)}
    return tree


def qwix_fn(qtype, tiled: bool):
    import qwix

    def one(x):
        if x.ndim < 2:
            return x
        kw = {"tiled_axes": {0: 128}, "channelwise_axes": (1,)} if tiled else {"channelwise_axes": (1,)}
        return qwix.quantize(x, qtype, **kw)

    return jax.jit(lambda t: jax.tree_util.tree_map(one, t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    tree = llama_tree(args.layers, args.d, args.ffn)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(tree))
    gb = n_params * 4 / 1e9
    print(f"# quantize throughput: {n_params / 1e6:.0f}M float32 params ({gb:.2f} GB)\n# {machine_line()}\n")

    # Memory-copy bandwidth: numpy copies of every leaf into preallocated buffers
    # (reads and writes each byte once, no allocation or page faults in the loop).
    host = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    dst = [np.empty_like(x) for x in host]

    def copy_all():
        for a, b in zip(dst, host):
            np.copyto(a, b)

    t_copy = time_fn(copy_all, repeats=args.repeats)
    rows = [("memory copy (np.copyto, preallocated)", f"{t_copy * 1e3:.0f}", f"{gb / t_copy:.2f}", "1.00", "")]

    results = {}
    for name, policy in [("int8 per-channel", "int8"), ("int4 g128", "int4-g128")]:
        fn = jax.jit(lambda t, p=policy: jaxq.quantize(t, p))
        t = time_fn(fn, tree, repeats=args.repeats)
        results[name] = t
        rows.append((f"jaxq {name}", f"{t * 1e3:.0f}", f"{gb / t:.2f}", f"{t / t_copy:.2f}", ""))
    try:
        for name, qtype, tiled in [("int8 per-channel", jnp.int8, False), ("int4 g128", jnp.int4, True)]:
            t = time_fn(qwix_fn(qtype, tiled), tree, repeats=args.repeats)
            rows.append((f"qwix {name}", f"{t * 1e3:.0f}", f"{gb / t:.2f}", f"{t / t_copy:.2f}", f"jaxq is {t / results[name]:.2f}x faster"))
    except ImportError:
        rows.append(("qwix", "-", "-", "-", "not installed (pip install -e .[bench])"))
    print(markdown_table(["what", "ms", "GB/s of float input", "time / copy", "vs jaxq"], rows))


if __name__ == "__main__":
    main()
