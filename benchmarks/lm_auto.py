"""Automatic per-kernel precision (``jaxq.auto_policy``) on real LMs, next to uniform formats.

Models and text:

* **SmolLM2-135M-Instruct** (``$JAXQ_DATA_DIR/smollm2_135m``, the GGUF file dequantized to float32,
  as in ``lm_quality.py``): calibration = ``--calib-windows`` random 256-token windows of Tiny
  Shakespeare's first 90%; held-out = ``--eval-windows`` non-overlapping windows of its last 10%.
* **TinyStories-656K** (``$JAXQ_DATA_DIR/tinystories_656k``): calibration = 16 sequences of 128
  tokens sampled from the float model itself (temperature 1, fixed seed; no TinyStories text ships
  with the data); held-out = ``benchmarks/tinystories_heldout.txt`` in 128-token windows.

What runs, in one process per model:

1. the sensitivity table of every block kernel for the candidates ``bf16, int8, int4-g32,
   int4-g64, int4-g128, int3-g32, int3-g64, int3-g128, int2-g32`` (group sizes that do not divide a
   kernel's input axis fitted to it: g128 -> g96 on SmolLM2's 576-wide inputs), both estimators:
   ``estimated`` (diagonal Fisher, all calibration windows) and ``measured`` (KL on the
   calibration windows with one kernel quantized, everything else float; on SmolLM2 only the
   first ``--measured-windows`` windows, to bound its 1000+ forward passes), timed, with their
   Spearman rank correlation;
2. uniform baselines (int8, int4-g32, int4-g128, int3-g64, int2-g32) and the heuristic "first
   and last blocks int8, the rest int4-g128", with RTN and with GPTQ (the default Recipe);
3. auto policies from the estimated table over several budgets (RTN: the curve; GPTQ: 3.5 and
   4.5 bits and the heuristic's exact byte count), plus the measured table's policies at 3.5 and
   4.5 bits (RTN), each with its predicted (sum of sensitivities) and measured KL on the
   calibration windows (the additivity check);
4. every row scored on the held-out text: perplexity, mean KL(float || quantized), top-1
   agreement, bits per weight of the block kernels (scales included; the tied embedding / head
   stays float32 and is outside the budget), and quantize seconds.

Writes ``benchmarks/results/lm_auto.json``; ``--plot`` (re)draws ``lm_auto_kl.png`` from it.

Usage::

    JAXQ_DATA_DIR=../shared/data python benchmarks/lm_auto.py [--models tinystories smollm2] [--plot]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_JSON = RESULTS / "lm_auto.json"
DEFAULT_PNG = RESULTS / "lm_auto_kl.png"
CANDIDATES = ("bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "int3-g32", "int3-g64", "int3-g128", "int2-g32")
UNIFORM = ("int8", "int4-g32", "int4-g128", "int3-g64", "int2-g32")
CURVE = (3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0, 6.0)
GPTQ_BUDGETS = (3.5, 4.5)


def _data_dir() -> Path:
    d = os.environ.get("JAXQ_DATA_DIR")
    if not d:
        sys.exit("set JAXQ_DATA_DIR to the shared data folder (with smollm2_135m/, tinystories_656k/, tinyshakespeare/)")
    return Path(d)


def setup(model: str, args: argparse.Namespace):
    """``(float LM, calibration windows [N, T], held-out text, eval window, eval windows)``."""
    import jax
    import jax.numpy as jnp

    import jaxq
    import jaxq.lm

    data = _data_dir()
    if model == "smollm2":
        lm = jaxq.lm.load(data / "smollm2_135m" / "SmolLM2-135M-Instruct.Q4_1.gguf")
        float_lm = lm.replace(params=jaxq.dequantize(lm.params, jnp.float32))
        text = (data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        ids = np.asarray(float_lm.encode(text[:cut], add_bos=False), np.int32)
        starts = np.random.default_rng(0).integers(0, len(ids) - 256, args.calib_windows)
        calib = np.stack([ids[s:s + 256] for s in starts])
        return float_lm, calib, text[cut:], 256, args.eval_windows
    lm = jaxq.lm.load(data / "tinystories_656k")
    module, params = lm.module, lm.params

    @jax.jit
    def step(toks, t, key):
        logits = module.apply({"params": params}, toks)
        return toks.at[:, t].set(jax.random.categorical(key, jnp.take(logits, t - 1, axis=1)))

    toks = jnp.zeros((16, 128), jnp.int32).at[:, 0].set(lm.config.bos_token_id)
    for t in range(1, 128):
        toks = step(toks, t, jax.random.fold_in(jax.random.key(0), t))
    stories = [s.strip() for s in (ROOT / "benchmarks" / "tinystories_heldout.txt").read_text().splitlines() if s.strip()]
    return lm, np.asarray(toks), "\n".join(stories), 128, None


def kernel_policy(lm: Any, spec_of: Any, name: str) -> Any:
    """Exact-path rules giving every block kernel ``spec_of(block index)`` (group sizes fitted)."""
    import jaxq
    from jaxq.algorithms.sensitivity import leaf_spec

    rules = []
    for layer in jaxq.algorithms.quantizable_layers(lm.params, jaxq.lm.auto.BLOCK_KERNELS):
        block = int(layer.path.split("/")[0].split("_")[1])
        rules.append(jaxq.Rule(f"^{layer.path}$", leaf_spec(jaxq.spec.as_spec(spec_of(block)), layer)))
    return jaxq.Policy(tuple(rules), name=name)


def heuristic_policy(lm: Any) -> Any:
    """First and last blocks int8 (per channel), every other block kernel int4-g128 (fitted)."""
    last = lm.config.num_layers - 1
    return kernel_policy(lm, lambda i: "int8" if i in (0, last) else "int4-g128", "first+last int8, rest int4-g128")


def uniform_policy(lm: Any, name: str) -> Any:
    return kernel_policy(lm, lambda i: name, name)


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    import jaxq
    import jaxq.lm
    from jaxq.algorithms.sensitivity import Evaluator, quantizable_layers, quantized_nbytes, rank_correlation
    from jaxq.algorithms.sequential import Recipe
    from benchmarks.lm_quality import block_bits

    lm, calib, held_out, window, max_windows = setup(model, args)
    print(f"[{model}] calibration {calib.shape}, held-out window {window}", flush=True)
    tables = {}
    t0 = time.perf_counter()
    tables["estimated"] = jaxq.lm.lm_sensitivity(lm, candidates=CANDIDATES, calib_tokens=calib, estimator="estimated")
    print(f"[{model}] estimated sensitivity {time.perf_counter() - t0:.1f} s", flush=True)
    mcal = calib if model != "smollm2" else calib[: args.measured_windows]
    t0 = time.perf_counter()
    tables["measured"] = jaxq.lm.lm_sensitivity(lm, candidates=CANDIDATES, calib_tokens=mcal, estimator="measured")
    print(f"[{model}] measured sensitivity {time.perf_counter() - t0:.1f} s", flush=True)
    quantized = [c for c, k in enumerate(tables["measured"].candidates) if k.spec is not None]
    rho = rank_correlation(tables["measured"].values[:, quantized], tables["estimated"].values[:, quantized])
    rho_per = {tables["measured"].candidates[c].label: rank_correlation(tables["measured"].values[:, c],
                                                                         tables["estimated"].values[:, c])
               for c in quantized}

    # the calibration objective of a policy (RTN), for the additivity check (first 8 windows: the
    # float reference's log-probabilities are cached, 4 x 256 x vocab floats per batch)
    cal = jaxq.lm.auto.calibration(lm, calib[:8], 4)
    ev = Evaluator(cal.fn, cal.params, cal.batches, "kl")

    rows: list[dict[str, Any]] = []
    ref_lm = lm

    def score(name: str, kind: str, method: str, policy: Any, report: Any = None, estimator: str | None = None):
        recipe = Recipe(method, policy=policy)
        t0 = time.perf_counter()
        qlm, _ = jaxq.lm.quantize_lm(lm, recipe, calib_tokens=calib, progress=False)
        jax.block_until_ready(qlm.params)
        dt = time.perf_counter() - t0
        res = jaxq.lm.evaluate(qlm, held_out, reference=ref_lm, window=window, max_windows=max_windows)
        row = dict(name=name, kind=kind, method=method, estimator=estimator, ppl=res["ppl"], kl=res["kl"],
                   top1=res["top1"], block_bits=block_bits(qlm.params), quantize_s=dt)
        if report is not None:
            row.update(budget_bits=report.budget_bits, predicted_calib_kl=report.predicted,
                       choices={c: sum(r.choice == c for r in report.layers) for c in CANDIDATES})

        if method == "rtn":
            row["calib_kl"] = ev.increase(jaxq.dequantize(jaxq.quantize(cal.params, policy)))
        rows.append(row)
        print(f"[{model}] {name:34s} {method:4s} bits {row['block_bits']:.3f} ppl {row['ppl']:.3f} "
              f"kl {row['kl']:.5f} top1 {row['top1']:.4f} ({dt:.0f} s)", flush=True)
        return row

    fl = jaxq.lm.evaluate(lm, held_out, reference=ref_lm, window=window, max_windows=max_windows)
    rows.append(dict(name="float32", kind="float", method="-", ppl=fl["ppl"], kl=0.0, top1=1.0, block_bits=32.0,
                     quantize_s=0.0))
    heur = heuristic_policy(lm)
    for name in UNIFORM:
        score(name, "uniform", "rtn", uniform_policy(lm, name))
    score(heur.name, "heuristic", "rtn", heur)
    # the heuristic's exact bytes over the block kernels: the auto policy "at the same size" gets these
    hb = sum(quantized_nbytes(heur.weight_spec(layer.path, 2), layer)
             for layer in quantizable_layers(lm.params, jaxq.lm.auto.BLOCK_KERNELS))
    for est in ("estimated", "measured"):
        budgets = CURVE if est == "estimated" else GPTQ_BUDGETS
        for b in budgets:
            pol, rep = jaxq.allocate(tables[est], jaxq.BitsPerWeight(b))
            score(f"auto {b} bits ({est})", "auto", "rtn", pol, rep, est)
    pol_h, rep_h = jaxq.allocate(tables["estimated"], jaxq.Bytes(hb))
    score("auto at the heuristic's bytes (estimated)", "auto-heuristic-size", "rtn", pol_h, rep_h, "estimated")
    if not args.no_gptq:
        g_uniform = {}
        for name in ("int4-g128", "int3-g64"):
            g_uniform[name] = score(name, "uniform", "gptq", uniform_policy(lm, name))
        score(heur.name, "heuristic", "gptq", heur)
        for b in GPTQ_BUDGETS:
            pol, rep = jaxq.allocate(tables["estimated"], jaxq.BitsPerWeight(b))
            score(f"auto {b} bits (estimated)", "auto", "gptq", pol, rep, "estimated")
        score("auto at the heuristic's bytes (estimated)", "auto-heuristic-size", "gptq", pol_h, rep_h, "estimated")
        gptq_s = g_uniform["int4-g128"]["quantize_s"]
    else:
        gptq_s = None
    return dict(
        model=model, calib_shape=list(calib.shape), measured_calib_shape=list(mcal.shape), window=window,
        eval_windows=max_windows, candidates=list(CANDIDATES), num_params=tables["estimated"].num_params,
        kernels=len(tables["estimated"].items),
        sensitivity_s={k: t.seconds for k, t in tables.items()}, gptq_int4_s=gptq_s,
        spearman=rho, spearman_per_candidate=rho_per, heuristic_bytes=hb, rows=rows)


def plot(data: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = data["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        for method, style in (("rtn", "-o"), ("gptq", "--s")):
            auto = sorted((r for r in m["rows"] if r["kind"] == "auto" and r["method"] == method
                           and r.get("estimator") == "estimated"), key=lambda r: r["block_bits"])
            if auto:
                ax.plot([r["block_bits"] for r in auto], [r["kl"] for r in auto], style, label=f"auto ({method.upper()})")
            uni = [r for r in m["rows"] if r["kind"] in ("uniform", "heuristic") and r["method"] == method]
            for r in uni:
                ax.scatter(r["block_bits"], r["kl"], marker="x" if method == "rtn" else "+", s=60,
                           color="C3" if method == "rtn" else "C4")
                label = "first+last int8" if r["kind"] == "heuristic" else r["name"]
                ax.annotate(f"{label} ({method.upper()})", (r["block_bits"], r["kl"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (block kernels, scales included)")
        ax.set_ylabel("KL(float || quantized), held-out")
        ax.set_title(m["model"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tinystories", "smollm2"], choices=["tinystories", "smollm2"])
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--measured-windows", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    ap.add_argument("--plot", action="store_true", help="only redraw the PNG from the JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plot:
        plot(json.loads(args.json.read_text()), args.png)
        return
    if args.child:
        out = run_model(args.child, args)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return
    from benchmarks.common import machine_line

    models = []
    for m in args.models:
        part = args.json.with_suffix(f".{m}.part.json")
        cmd = [sys.executable, __file__, "--child", m, "--json", str(part), "--calib-windows", str(args.calib_windows),
               "--measured-windows", str(args.measured_windows), "--eval-windows", str(args.eval_windows)]
        if args.no_gptq:
            cmd.append("--no-gptq")
        subprocess.run(cmd, check=True)
        models.append(json.loads(part.read_text()))
        part.unlink()
    data = dict(benchmark="lm_auto", machine=machine_line(), date=time.strftime("%Y-%m-%d"), models=models)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.png)


if __name__ == "__main__":
    main()
