"""Peak host memory of loading an HF safetensors checkpoint with and without quantize-at-load.

Writes a random-init Llama-shaped HF folder (float32 safetensors, ``--hidden`` / ``--layers`` /
``--vocab``), then loads it in fresh processes with ``jaxq.lm.load(path)`` (float) and with
``jaxq.lm.load(path, quantize=preset)`` for each preset, and reports each process's peak RSS
above the same process right after importing jaxq (``VmHWM``), next to the checkpoint's bytes and
the loaded tree's bytes.

Usage::

    python benchmarks/lm_load_memory.py [--json benchmarks/results/lm_load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "lm_load_memory.json"


def _hwm() -> int:
    """Peak resident bytes of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(folder: str, preset: str) -> None:
    import jax

    import jaxq
    import jaxq.lm

    base = _hwm()
    t0 = time.perf_counter()
    lm = jaxq.lm.load(folder, quantize=None if preset == "float" else preset)
    jax.block_until_ready(lm.params)
    dt = time.perf_counter() - t0
    peak = _hwm()
    print("ROW " + json.dumps(dict(preset=preset, seconds=dt, rss_before=base, peak_rss=peak,
                                    tree_bytes=jaxq.tree_nbytes(lm.params))), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--presets", nargs="+", default=["float", "int8", "int4-g128"])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import machine_line
    from jaxq.lm.hf import write_hf
    from jaxq.models.decoder import Decoder
    from jaxq.models.decoder_config import DecoderConfig

    d = args.hidden
    cfg = DecoderConfig(arch="llama", vocab_size=args.vocab, hidden_size=d, intermediate_size=int(2.75 * d),
                        num_layers=args.layers, num_heads=d // 64, num_kv_heads=max(1, d // 256), head_dim=64,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(np.float32), shapes)
    with tempfile.TemporaryDirectory() as tmp:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(args.vocab)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        folder = write_hf(Path(tmp) / "model", cfg, params, tok)
        del params
        ckpt_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        rows = []
        for preset in args.presets:
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), preset], capture_output=True,
                                 text=True, timeout=1800)
            line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
            if out.returncode or not line:
                raise SystemExit(f"{preset}: {out.stderr[-2000:]}")
            r = json.loads(line[-1][4:])
            r["peak_above_base"] = r["peak_rss"] - r["rss_before"]
            r["peak_vs_tree"] = r["peak_above_base"] / r["tree_bytes"]
            r["peak_vs_checkpoint"] = r["peak_above_base"] / ckpt_bytes
            rows.append(r)
            print(f"{preset:10s}: tree {r['tree_bytes'] / 2**20:7.1f} MiB, peak above base "
                  f"{r['peak_above_base'] / 2**20:7.1f} MiB ({r['peak_vs_checkpoint']:.2f}x the checkpoint), "
                  f"{r['seconds']:.1f} s", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "lm_load_memory", "checkpoint_bytes": ckpt_bytes, "parameters": cfg.num_parameters(),
        "config": cfg.to_dict(), "machine": machine_line(), "date": time.strftime("%Y-%m-%d"), "rows": rows},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
