"""Decode and prefill speed of SmolLM2-135M on this machine: float32 vs int8 vs int4 g128 weights,
float vs int8 KV cache, batch 1 and 8, in one run.

Each configuration runs the real generation path of :mod:`jaxq.lm.generate` (one jitted
prefill of a 64-token prompt, then one jitted ``while_loop`` of 128 decode steps over the
preallocated cache, no early stop), compiled once before timing; the median of ``--repeats``
runs is reported. Tokens per second count every row of the batch. Weight configurations
quantize every Dense kernel, the tied output head included (the token lookup reads the same
tree): ``int8`` is per output channel, ``int4-g128`` packs two codes per byte with groups of 128.

Usage::

    JAXQ_DATA_DIR=../shared/data python benchmarks/lm_decode.py [--json benchmarks/results/lm_decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "lm_decode.json"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--weights", nargs="+", default=["float32", "int8", "int4-g128"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxq
    import jaxq.lm
    from benchmarks.common import machine_line
    from jaxq.lm.generate import _decode, _prefill

    data = os.environ.get("JAXQ_DATA_DIR")
    if not data:
        sys.exit("set JAXQ_DATA_DIR to the shared data folder (with smollm2_135m/)")
    lm = jaxq.lm.load(Path(data) / "smollm2_135m" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    float_params = jaxq.dequantize(lm.params, jnp.float32)
    # 128 does not divide SmolLM2's width 576: "int4-g128" uses groups of 96 on the 576-wide
    # inputs and 128 on down_proj's 1536 (the group sizes Recipe.fit_groups picks).
    policies = {
        "int8": "int8",
        "int4-g128": jaxq.Policy((jaxq.Rule(r"down_proj/kernel$", "int4-g128"), jaxq.Rule(r"kernel$", "int4-g96"))),
    }
    trees = {w: float_params if w == "float32" else jaxq.quantize(float_params, policies.get(w, w))
             for w in args.weights}
    module = lm.module
    rng = np.random.default_rng(0)
    configs = [(w, "float") for w in args.weights] + [("float32", "int8")]
    if "int8" in args.weights:
        configs.append(("int8", "int8"))
    rows = []
    for b in args.batches:
        prompt = jnp.asarray(rng.integers(100, 20000, (b, args.prompt_len)), jnp.int32)
        for w, kv in configs:
            params = trees[w]
            total = args.prompt_len + args.new_tokens
            no_eos = jnp.asarray([-1], jnp.int32)

            def prefill():
                cache = module.init_cache(b, total, kv)
                return _prefill(module, params, prompt, cache)

            def decode(first, cache):
                return _decode(module, params, first, cache, jax.random.key(0), no_eos, steps=args.new_tokens,
                               temperature=0.0, top_k=None, top_p=None)

            logits, cache = jax.block_until_ready(prefill())  # compile both
            first = jnp.argmax(logits, -1).astype(jnp.int32)
            jax.block_until_ready(decode(first, cache))
            pre, dec = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                logits, cache = jax.block_until_ready(prefill())
                t1 = time.perf_counter()
                jax.block_until_ready(decode(first, cache))
                t2 = time.perf_counter()
                pre.append(t1 - t0)
                dec.append(t2 - t1)
            row = dict(batch=b, weights=w, kv_cache=kv, prefill_s=statistics.median(pre),
                       decode_s=statistics.median(dec),
                       prefill_tok_s=b * args.prompt_len / statistics.median(pre),
                       decode_tok_s=b * (args.new_tokens - 1) / statistics.median(dec),
                       weight_bytes=jaxq.tree_nbytes(params),
                       cache_bytes=int(module.init_cache(b, total, kv).nbytes))
            rows.append(row)
            print(f"batch {b} weights {w:9s} kv {kv:5s}: prefill {row['prefill_tok_s']:8.1f} tok/s, "
                  f"decode {row['decode_tok_s']:7.1f} tok/s, weights {row['weight_bytes'] / 2**20:.0f} MiB, "
                  f"cache {row['cache_bytes'] / 2**20:.1f} MiB", flush=True)
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["weights"] == "float32" and x["kv_cache"] == "float")
        r["decode_vs_float"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_vs_float"] = r["prefill_tok_s"] / base["prefill_tok_s"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "lm_decode", "model": "SmolLM2-135M-Instruct", "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
