"""Block-by-block quantization of a >= 1B-parameter Llama on CPU within 1.5x its bf16 size.

A randomly initialised Llama with TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 22 layers,
32 query / 4 KV heads, vocab 32000; 1.10 B parameters, 2.2 GB in bf16) is quantized with
:func:`jaxq.algorithms.sequential.quantize_blocks`, twice, each in a fresh process:

* ``rtn``: int4, groups of 128 (round to nearest);
* ``gptq``: int4 g128 GPTQ (act-order, true-sequential, MSE-searched group scales, and the
  float model's layer outputs as the target, which carries a second, float activation stream)
  on a few calibration sequences.

The weights are *generated lazily block by block*, directly in bf16, the way a sharded
checkpoint would be read: the float model is never whole in memory (and never in float32).
What stays resident is the quantized model (int4 codes + scales), the bf16 embedding table,
one float block at a time and the calibration activations of one block boundary. The LM head
(bf16, counted in the model's size) is never needed for quantization and is not generated.

Reported per run: peak RSS of the process (``resource.getrusage``, includes the JAX runtime),
its ratio to the model's bf16 bytes (must be <= 1.5), time per block (the first includes JIT
compilation), total time, and the quantized blocks' bytes.

Usage::

    python benchmarks/llm_scale.py                  # both runs, one subprocess each
    python benchmarks/llm_scale.py --method gptq --blocks 3   # a quick partial run in-process
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_one(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxq.algorithms.sequential import Recipe, quantize_blocks
    from jaxq.models import Llama, LlamaConfig
    from jaxq.quantize import tree_nbytes

    rss_start = _peak_rss_bytes()
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
    )
    model = Llama(cfg, param_dtype=jnp.bfloat16)
    block = model.block_module()
    abstract = jax.eval_shape(block.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, cfg.hidden_size), jnp.float32))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    block_params = sum(int(x.size) for x in leaves)
    n_params = cfg.num_layers * block_params + 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    model_bf16_bytes = 2 * n_params

    @jax.jit
    def make_block(key):
        """One block's params, drawn directly in bf16: N(0, 0.02) kernels, unit norm scales."""
        keys = jax.random.split(key, len(leaves))
        out = [
            jnp.ones(s.shape, jnp.bfloat16) if len(s.shape) == 1 else (0.02 * jax.random.normal(k, s.shape, jnp.bfloat16))
            for k, s in zip(keys, leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    base = jax.random.key(args.seed)
    embedding = (0.02 * jax.random.normal(jax.random.fold_in(base, 10_000), (cfg.vocab_size, cfg.hidden_size), jnp.bfloat16))
    tokens = jax.random.randint(jax.random.fold_in(base, 20_000), (args.calib, args.seq), 0, cfg.vocab_size)
    h = jnp.take(embedding, tokens, axis=0).astype(jnp.float32)

    recipe = Recipe(args.method, "int4-g128")
    n_blocks = args.blocks or cfg.num_layers
    t0 = time.perf_counter()
    qblocks, h_out, reports = quantize_blocks(
        model, h, lambda i: make_block(jax.random.fold_in(base, i)), recipe,
        num_blocks=n_blocks, batch_size=args.calib, progress=args.progress,
    )
    total = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    times = [r.seconds for r in reports]
    return {
        "method": args.method,
        "params": n_params,
        "model_bf16_bytes": model_bf16_bytes,
        "blocks_done": n_blocks,
        "blocks_total": cfg.num_layers,
        "quantized_blocks_bytes": int(sum(tree_nbytes(q) for q in qblocks)),
        "float_blocks_bf16_bytes": 2 * block_params * n_blocks,
        "embedding_bytes": int(embedding.size * 2),
        "peak_rss_bytes": peak,
        "rss_before_model_bytes": rss_start,
        "rss_ratio": peak / model_bf16_bytes,
        "first_block_s": times[0],
        "median_block_s": statistics.median(times[1:] or times),
        "total_s": total,
        "calib_tokens": int(args.calib * args.seq),
        "h_out_finite": bool(jnp.all(jnp.isfinite(h_out))),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
    }


def _table(results: list[dict]) -> str:
    from benchmarks.common import markdown_table

    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    rows = [
        [r["method"], f"{r['params'] / 1e9:.3f} B", gb(r["model_bf16_bytes"]), f"{r['blocks_done']}/{r['blocks_total']}",
         r["calib_tokens"] if r["method"] != "rtn" else "-", gb(r["peak_rss_bytes"]), f"{r['rss_ratio']:.2f}",
         f"{r['first_block_s']:.1f}", f"{r['median_block_s']:.1f}", f"{r['total_s']:.0f}", gb(r["quantized_blocks_bytes"]),
         "yes" if r["rss_ratio"] <= 1.5 else "NO"]
        for r in results
    ]
    headers = ["method (int4 g128)", "params", "model bf16 GB", "blocks", "calib tokens", "peak RSS GB",
               "RSS / bf16", "block 0 s (compile)", "median block s", "total s", "quantized blocks GB", "<= 1.5x"]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["rtn", "gptq"], default=None, help="one run in this process (default: both, in subprocesses)")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--calib", type=int, default=4, help="calibration sequences")
    ap.add_argument("--seq", type=int, default=128, help="calibration sequence length")
    ap.add_argument("--blocks", type=int, default=0, help="quantize only the first N blocks (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args(argv)

    if args.method is not None:
        res = run_one(args)
        print(json.dumps(res) if args.json else _table([res]), flush=True)
        return
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")]
    if args.out is not None:  # drop the value that followed --out
        passthrough = [a for a in passthrough if a != str(args.out)]
    for method in ("rtn", "gptq"):
        cmd = [sys.executable, __file__, "--method", method, "--json", *passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{method} run failed ({proc.returncode})")
        if args.progress:
            sys.stderr.write(proc.stdout)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{method}: peak RSS {results[-1]['peak_rss_bytes'] / 1e9:.2f} GB, {results[-1]['total_s']:.0f} s", flush=True)
    table = _table(results)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
