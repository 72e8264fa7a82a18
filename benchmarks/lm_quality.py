"""Post-training quantization of a real LM (SmolLM2-135M-Instruct from its GGUF file): jaxq vs Qwix.

Model: ``$JAXQ_DATA_DIR/smollm2_135m/SmolLM2-135M-Instruct.Q4_1.gguf``. Its linear layers are
stored as Q4_1 (asymmetric int4, groups of 32); the reference "float" model is that file
dequantized to float32 (exactly the weights llama.cpp serves). Every quantized row starts from
the float32 weights.

Text: Tiny Shakespeare (``$JAXQ_DATA_DIR/tinyshakespeare/input.txt``). Calibration windows are
drawn from its first 90% (``--calib-windows`` windows of ``--seq-len`` tokens at random offsets,
fixed seed); the held-out score uses non-overlapping windows of its last 10%. Columns:
perplexity, mean KL(float || quantized) of the next-token distributions, top-1 agreement with
float, bits per weight of the decoder blocks (scales and zero points included), stored bytes of
the whole tree, wall time to quantize (cold process: JIT compilation included; calibration
forwards included) and the peak RSS of that process.

Every row runs in its own fresh process (``--row NAME``), so peak RSS and quantize time are the
method's own. Qwix rows use ``qwix.contrib`` (PTQ, GPTQ, AWQ, SmoothQuant) on the same Flax
model, the same calibration tokens and the same evaluation.

Usage::

    JAXQ_DATA_DIR=../shared/data python benchmarks/lm_quality.py [--rows REGEX] [--no-qwix]
        [--json benchmarks/results/lm_quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "lm_quality.json"

# name -> (setting, method, library, options)
ROWS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "float": ("float32", "-", "-", {}),
    "w4g128-rtn": ("W4 g128 (g96 where 128 does not divide)", "RTN", "jaxq", dict(method="rtn", spec="int4-g128")),
    "w4g128-mse": ("W4 g128 (g96 where 128 does not divide)", "MSE clip", "jaxq", dict(method="mse", spec="int4-g128")),
    "w4g128-gptq": ("W4 g128 (g96 where 128 does not divide)", "GPTQ", "jaxq", dict(method="gptq", spec="int4-g128")),
    "w4g128-awq": ("W4 g128 (g96 where 128 does not divide)", "AWQ", "jaxq", dict(method="awq", spec="int4-g128")),
    "w3g64-rtn": ("W3 g64", "RTN", "jaxq", dict(method="rtn", spec="int3-g64")),
    "w3g64-gptq": ("W3 g64", "GPTQ", "jaxq", dict(method="gptq", spec="int3-g64")),
    "w8a8-rtn": ("W8A8", "RTN", "jaxq", dict(method="rtn", spec="int8", act_spec="int8")),
    "w8a8-sq": ("W8A8", "SmoothQuant", "jaxq", dict(method="smoothquant", spec="int8")),
    # GGUF Q4_1's grid: x = d * q + m with m the group minimum (a value-domain zero point). The
    # file's weights lie on it, so this row should reproduce the float model.
    "w4g32asym-rtn": ("W4 g32 asym, value-domain zero point (the file's own Q4_1 grid)", "RTN", "jaxq",
                      dict(method="rtn", spec=dict(format="int4", granularity="per_group", group_size=32,
                                                   symmetric=False, zero_point_domain="value"))),
    "w4g32asym-code-rtn": ("W4 g32 asym, code-domain zero point (zero exactly representable)", "RTN", "jaxq",
                           dict(method="rtn", spec=dict(format="int4", granularity="per_group", group_size=32,
                                                        symmetric=False))),
    "kv-int8": ("KV cache int8", "-", "jaxq", dict(kv_cache="int8")),
    "kv-fp8": ("KV cache fp8 e4m3", "-", "jaxq", dict(kv_cache="fp8")),
    "qwix-w4g128-rtn": ("W4 g128 (g96 where 128 does not divide)", "RTN", "qwix", dict(method="RTN", weight_qtype="int4", tile_size=128)),
    "qwix-w4g128-gptq": ("W4 g128 (g96 where 128 does not divide)", "GPTQ", "qwix", dict(method="GPTQ", weight_qtype="int4", tile_size=128)),
    "qwix-w4g128-awq": ("W4 g128 (g96 where 128 does not divide)", "AWQ", "qwix", dict(method="AWQ", weight_qtype="int4", tile_size=128)),
    "qwix-w3g64-rtn": ("W3 g64", "RTN", "qwix", dict(method="RTN", weight_qtype="int3", tile_size=64)),
    "qwix-w3g64-gptq": ("W3 g64", "GPTQ", "qwix", dict(method="GPTQ", weight_qtype="int3", tile_size=64)),
    "qwix-w8a8-rtn": ("W8A8", "RTN", "qwix", dict(method="RTN", weight_qtype="int8", act_qtype="int8")),
    "qwix-w8a8-sq": ("W8A8", "SmoothQuant", "qwix", dict(method="SmoothQuant", weight_qtype="int8", act_qtype="int8")),
}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _data_dir() -> Path:
    d = os.environ.get("JAXQ_DATA_DIR")
    if not d:
        sys.exit("set JAXQ_DATA_DIR to the shared data folder (with smollm2_135m/ and tinyshakespeare/)")
    return Path(d)


def setup(args: argparse.Namespace):
    import jax.numpy as jnp
    import numpy as np

    import jaxq
    import jaxq.lm

    data = _data_dir()
    lm = jaxq.lm.load(data / "smollm2_135m" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    float_lm = lm.replace(params=jaxq.dequantize(lm.params, jnp.float32))
    text = (data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train, held_out = text[:cut], text[cut:]
    ids = np.asarray(float_lm.encode(train, add_bos=False), np.int32)
    rng = np.random.default_rng(args.calib_seed)
    starts = rng.integers(0, len(ids) - args.seq_len, args.calib_windows)
    calib = np.stack([ids[s:s + args.seq_len] for s in starts])
    return float_lm, calib, held_out


def block_bits(params: Any) -> float:
    """Stored bits per weight of jaxq's decoder-block matrices (scales and zero points included)."""
    import jax

    from jaxq.qarray import QArray

    bits = count = 0
    for k, v in params.items():
        if not k.startswith("layers_"):
            continue
        for leaf in jax.tree.leaves(v, is_leaf=lambda x: isinstance(x, QArray)):
            if len(leaf.shape) < 2:
                continue
            n = int(np.prod(leaf.shape))
            count += n
            bits += 8 * leaf.nbytes if isinstance(leaf, QArray) else n * jnp_bits(leaf.dtype)
    return bits / max(count, 1)


def jnp_bits(dt) -> int:
    import jax.numpy as jnp

    return jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else 8 * dt.itemsize


def qwix_block_bits(params: Any) -> float:
    """Bits per weight of Qwix's decoder-block matrices: codes at their bit width plus scales."""
    import jax

    bits = count = 0
    for k, v in params.items():
        if not k.startswith("layers_"):
            continue
        for path, leaf in jax.tree_util.tree_leaves_with_path(v):
            if not hasattr(leaf, "dtype"):
                continue
            n = leaf.size
            if "kernel" in jax.tree_util.keystr(path) and leaf.ndim >= 2 and "scale" not in jax.tree_util.keystr(path):
                count += n
            if leaf.ndim >= 2 or "scale" in jax.tree_util.keystr(path):
                bits += n * jnp_bits(leaf.dtype)
    return bits / max(count, 1)


def run_jaxq(name: str, opts: dict[str, Any], float_lm, calib, held_out, args) -> dict[str, Any]:
    import jaxq.lm
    from jaxq.algorithms.sequential import Recipe
    from jaxq.spec import QuantSpec

    if "kv_cache" in opts or name == "float":
        res = jaxq.lm.evaluate(float_lm, held_out, reference=float_lm, window=args.seq_len,
                               max_windows=args.eval_windows, kv_cache=opts.get("kv_cache", "float"))
        res.update(quantize_s=0.0, block_bits=32.0)
        return res
    spec = opts["spec"]
    spec = QuantSpec(**spec) if isinstance(spec, dict) else spec
    recipe = Recipe(method=opts["method"], spec=spec, act_spec=opts.get("act_spec"), fit_groups=True)
    t0 = time.perf_counter()
    qlm, _ = jaxq.lm.quantize_lm(float_lm, recipe, calib_tokens=calib, progress=True)
    import jax

    jax.block_until_ready(qlm.params)
    dt = time.perf_counter() - t0
    res = jaxq.lm.evaluate(qlm, held_out, reference=float_lm, window=args.seq_len, max_windows=args.eval_windows)
    res.update(quantize_s=dt, block_bits=block_bits(qlm.params))
    return res


def run_qwix(name: str, opts: dict[str, Any], float_lm, calib, held_out, args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import qwix

    from jaxq.lm.evaluate import _batch_metrics, token_windows

    kw = dict(opts)
    method = kw.pop("method")
    for k in ("weight_qtype", "act_qtype"):
        if k in kw and kw[k] in ("int8", "int4"):
            kw[k] = getattr(jnp, kw[k])
    from benchmarks.llm_quality import qwix_method, tree_bytes

    rule_cls, cal_cls, qfn, infer = qwix_method(method)
    model, params = float_lm.module, float_lm.params
    rules = [rule_cls(module_path=r"layers_\d+/.*", **kw)]
    if "tile_size" in kw:  # the same per-width group sizes as jaxq's fit_groups (128 does not divide 576)
        from jaxq.algorithms.sequential import Recipe

        fit = Recipe(spec=f"int4-g{kw['tile_size']}", fit_groups=True).spec_for
        c = float_lm.config
        rules = [rule_cls(module_path=r"layers_\d+/mlp/down_proj", **(kw | {"tile_size": fit(c.intermediate_size).group_size})),
                 rule_cls(module_path=r"layers_\d+/.*", **(kw | {"tile_size": fit(c.hidden_size).group_size}))]
    t0 = time.perf_counter()
    qm = qwix.quantize_model(model, infer(rules))
    ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
    calib = jnp.asarray(calib)
    abs_q = jax.eval_shape(ptq_model.init, jax.random.key(0), calib[:1])["params"]
    if cal_cls is None:
        qp = qwix.quantize_params(params, abs_q)
    else:
        cm = qwix.quantize_model(model, cal_cls(rules))
        stats = None
        for i in range(0, calib.shape[0], 4):  # Qwix accumulates its statistics over calls
            variables = {"params": params} if stats is None else {"params": params, "quant_stats": stats}
            _, state = cm.apply(variables, calib[i:i + 4], mutable=["quant_stats"])
            stats = state["quant_stats"]
        qp = qfn(params, abs_q, stats)
    jax.block_until_ready(qp)
    dt = time.perf_counter() - t0
    apply = jax.jit(lambda p, t: qm.apply({"params": p}, t))
    ref_apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    wins = token_windows(float_lm.encode(held_out, add_bos=False), args.seq_len, None, args.eval_windows)
    nll = kl = top1 = 0.0
    for i in range(0, len(wins), 4):
        t = jnp.asarray(wins[i:i + 4])
        a, b, c = _batch_metrics(apply(qp, t), ref_apply(params, t), t)
        nll, kl, top1 = nll + float(a), kl + float(b), top1 + float(c)
    n = wins.shape[0] * (wins.shape[1] - 1)
    import math

    return dict(ppl=math.exp(nll / n), kl=kl / n, top1=top1 / n, tokens=n, bytes=tree_bytes(qp),
                block_bits=qwix_block_bits(qp), quantize_s=dt)


def child(name: str, args: argparse.Namespace) -> None:
    setting, method, lib, opts = ROWS[name]
    float_lm, calib, held_out = setup(args)
    fn = run_qwix if lib == "qwix" else run_jaxq
    res = fn(name, opts, float_lm, calib, held_out, args)
    res.update(name=name, setting=setting, method=method, library=lib, peak_rss_bytes=_peak_rss(),
               calib_tokens=int(calib.size))
    print("ROW " + json.dumps(res), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=None, help="regex on row names (default: all); see ROWS")
    ap.add_argument("--no-qwix", action="store_true")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # child mode: run one row, print it
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.row:
        child(args.row, args)
        return
    from benchmarks.common import machine_line

    names = [n for n in ROWS if (args.rows is None or re.search(args.rows, n))
             and not (args.no_qwix and ROWS[n][2] == "qwix")]
    previous = {}
    if args.json.is_file():
        previous = {r["name"]: r for r in json.loads(args.json.read_text()).get("rows", [])}
    rows = dict(previous)
    for name in names:
        cmd = [sys.executable, __file__, "--row", name, "--seq-len", str(args.seq_len), "--calib-windows",
               str(args.calib_windows), "--calib-seed", str(args.calib_seed), "--eval-windows", str(args.eval_windows)]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
            if out.returncode or not line:
                tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
                res = dict(name=name, setting=ROWS[name][0], method=ROWS[name][1], library=ROWS[name][2],
                           note=f"fails: {' | '.join(tail)[:200]}")
            else:
                res = json.loads(line[-1][4:])
        except subprocess.TimeoutExpired:
            res = dict(name=name, setting=ROWS[name][0], method=ROWS[name][1], library=ROWS[name][2],
                       note=f"not finished in {args.timeout} s")
        res["wall_s"] = time.perf_counter() - t0
        rows[name] = res
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                                      if k in ("ppl", "kl", "top1", "block_bits", "quantize_s", "peak_rss_bytes", "note")),
              flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        order = [n for n in ROWS if n in rows]
        args.json.write_text(json.dumps({
            "benchmark": "lm_quality", "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
            "text": "Tiny Shakespeare: calibration from the first 90%, held-out = last 10%",
            "seq_len": args.seq_len, "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
            "machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
            "rows": [rows[n] for n in order]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
