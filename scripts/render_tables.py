"""Writes the benchmark tables into BENCHMARKS.md and README.md from the benchmarks' JSON outputs.

A table lives between two markers in a Markdown file::

    <!-- table:lm_quality -->
    ... (replaced on every run)
    <!-- /table:lm_quality -->

Each table name has a renderer below that reads ``benchmarks/results/<file>.json``; a marker
whose JSON is missing is left as it is and reported. Run it after a benchmark::

    python scripts/render_tables.py            # rewrite the tables
    python scripts/render_tables.py --check    # exit 1 if a file is out of date (CI-friendly)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FILES = [ROOT / "BENCHMARKS.md", ROOT / "README.md"]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in cells[1:]])


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def lm_quality(full: bool) -> str | None:
    d = _load("lm_quality")
    if d is None:
        return None
    rows = d["rows"]
    base = next((r for r in rows if r["name"] == "float"), None)
    out = []
    for r in rows:
        if "ppl" not in r:
            if full:
                out.append([r["setting"], r["method"], r["library"], "-", "-", "-", "-", "-", "-", "-", r.get("note", "")])
            continue
        inc = None if base is None else 100 * (r["ppl"] / base["ppl"] - 1)
        rss = r.get("peak_rss_bytes")
        cells = [r["setting"], r["method"], r["library"], _f(r["ppl"], ".3f"), _f(inc, "+.2f") + "%" if inc is not None else "-",
                 _f(r.get("kl"), ".4f"), _f(r.get("top1"), ".3f"), _f(r.get("block_bits"), ".2f")]
        if full:
            cells += [_f(r.get("quantize_s"), ".1f"), "-" if rss is None else f"{rss / 2**30:.2f}", r.get("note", "")]
        out.append(cells)
    headers = ["setting", "method", "library", "ppl", "vs float", "KL", "top-1", "block bits/w"]
    if full:
        headers += ["quantize s", "peak RSS GiB", "note"]
    caption = (f"SmolLM2-135M-Instruct, {d['text']}; {d['eval_windows']} held-out windows of {d['seq_len']} tokens, "
               f"{d['calib_windows']} calibration windows. {d['machine']}; measured {d['date']}.")
    return caption + "\n\n" + _table(headers, out)


def lm_quality_goals() -> str | None:
    """The issue's goals, computed from the same JSON: recovery of RTN's perplexity increase etc."""
    d = _load("lm_quality")
    if d is None:
        return None
    by = {r["name"]: r for r in d["rows"] if "ppl" in r}
    if "float" not in by:
        return None
    f = by["float"]["ppl"]

    def rec(name: str, rtn: str) -> str:
        if name not in by or rtn not in by:
            return "not measured"
        return f"{100 * (by[rtn]['ppl'] - by[name]['ppl']) / (by[rtn]['ppl'] - f):.0f}%"

    def inc(name: str) -> str:
        return "not measured" if name not in by else f"{100 * (by[name]['ppl'] / f - 1):+.2f}%"

    rows = [
        ["W4 g128 GPTQ recovers of RTN's perplexity increase", rec("w4g128-gptq", "w4g128-rtn"), ">= 50%"],
        ["W4 g128 AWQ recovers", rec("w4g128-awq", "w4g128-rtn"), ">= 50%"],
        ["W3 g64 GPTQ recovers", rec("w3g64-gptq", "w3g64-rtn"), "-"],
        ["Qwix W4 g128 AWQ recovers", rec("qwix-w4g128-awq", "qwix-w4g128-rtn"), "-"],
        ["W8A8 SmoothQuant vs float perplexity", inc("w8a8-sq"), "within 1%"],
        ["W8A8 RTN vs float perplexity", inc("w8a8-rtn"), "-"],
        ["KV cache int8 vs float perplexity", inc("kv-int8"), "within 0.5%"],
        ["KV cache fp8 vs float perplexity", inc("kv-fp8"), "-"],
    ]
    return _table(["goal", "measured", "target"], rows)


def lm_decode(full: bool) -> str | None:
    d = _load("lm_decode")
    if d is None:
        return None
    out = []
    for r in d["rows"]:
        out.append([r["batch"], r["weights"], r["kv_cache"], f"{r['decode_tok_s']:.1f}", f"{r['decode_vs_float']:.2f}x",
                    f"{r['prefill_tok_s']:.0f}", f"{r['prefill_vs_float']:.2f}x", f"{r['weight_bytes'] / 2**20:.0f}",
                    f"{r['cache_bytes'] / 2**20:.1f}"])
    caption = (f"SmolLM2-135M-Instruct, {d['prompt_len']}-token prompt then {d['new_tokens']} new tokens, "
               f"median of {d['repeats']}. {d['machine']}; measured {d['date']}.")
    return caption + "\n\n" + _table(["batch", "weights", "KV cache", "decode tok/s", "vs float", "prefill tok/s",
                                      "vs float", "weights MiB", "cache MiB"], out)


def lm_load_memory(full: bool) -> str | None:
    d = _load("lm_load_memory")
    if d is None:
        return None
    out = [[r["preset"], f"{r['tree_bytes'] / 2**20:.0f}", f"{r['peak_above_base'] / 2**20:.0f}",
            f"{r['peak_vs_checkpoint']:.2f}x", f"{(r['peak_above_base'] - r['tree_bytes']) / 2**20:.0f}",
            f"{r['seconds']:.1f}"] for r in d["rows"]]
    c = d["config"]
    largest = max(c["vocab_size"] * c["hidden_size"], c["hidden_size"] * c["intermediate_size"]) * 4
    caption = (f"Random-init Llama-shaped HF checkpoint, {d['parameters'] / 1e6:.0f}M parameters, float32 safetensors "
               f"of {d['checkpoint_bytes'] / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB). "
               f"{d['machine']}; measured {d['date']}.")
    return caption + "\n\n" + _table(["load", "tree MiB", "peak RSS above start MiB", "vs checkpoint",
                                       "peak minus tree MiB", "seconds"], out)


def _auto_model_name(m: dict[str, Any]) -> str:
    return {"smollm2": "SmolLM2-135M", "tinystories": "TinyStories-656K"}.get(m["model"], m["model"])


def lm_auto(full: bool) -> str | None:
    d = _load("lm_auto")
    if d is None:
        return None
    parts = []
    for m in d["models"]:
        base = {r["method"]: r["kl"] for r in m["rows"] if r["kind"] == "uniform" and r["name"] == "int4-g128"}
        out = []
        for r in m["rows"]:
            if not full and r["kind"] == "auto" and r["method"] == "rtn" and r.get("budget_bits") not in (3.5, 4.5):
                continue
            ref = base.get(r["method"])
            vs = "-" if not ref or r["kind"] == "float" else f"{100 * (r['kl'] / ref - 1):+.0f}%"
            pred = r.get("predicted_calib_kl")
            out.append([r["name"], r["method"].upper() if r["method"] != "-" else "-", f"{r['block_bits']:.3f}",
                        f"{r['ppl']:.3f}", f"{r['kl']:.4f}", vs, f"{r['top1']:.3f}",
                        "-" if pred is None else f"{pred:.4f}", _f(r.get("calib_kl"), ".4f"),
                        f"{r['quantize_s']:.0f}"])
        s_est, s_meas = m["sensitivity_s"]["estimated"], m["sensitivity_s"]["measured"]
        g = m.get("gptq_int4_s")
        ratio = "" if not g else (f" One GPTQ int4-g128 run took {g:.0f} s: the estimated pass is {s_est / g:.2f}x "
                                  f"of it, the measured pass {s_meas / g:.2f}x.")
        cap = (f"**{_auto_model_name(m)}**: {m['kernels']} block kernels, {m['num_params'] / 1e6:.2f}M weights; "
               f"calibration {m['calib_shape'][0]} x {m['calib_shape'][1]} tokens (measured sensitivity on "
               f"{m['measured_calib_shape'][0]} x {m['measured_calib_shape'][1]}). Sensitivity pass: estimated "
               f"{s_est:.0f} s, measured {s_meas:.0f} s; Spearman rank correlation between the two over every "
               f"(kernel, quantized candidate): {m['spearman']:.3f}.{ratio}")
        parts.append(cap + "\n\n" + _table(
            ["policy", "method", "bits/weight", "ppl", "KL", "KL vs uniform int4-g128", "top-1",
             "predicted calib KL", "measured calib KL", "quantize s"], out))
    return f"{d['machine']}; measured {d['date']}.\n\n" + "\n\n".join(parts)


def lm_auto_goals() -> str | None:
    d = _load("lm_auto")
    if d is None:
        return None
    rows = []
    for m in d["models"]:
        name = _auto_model_name(m)
        for method in ("rtn", "gptq"):
            rs = [r for r in m["rows"] if r["method"] == method]

            def get(kind, pred):
                return next((r for r in rs if r["kind"] == kind and pred(r)), None)

            uni4 = get("uniform", lambda r: r["name"] == "int4-g128")
            uni3 = get("uniform", lambda r: r["name"] == "int3-g64")
            heur = get("heuristic", lambda r: True)
            a45 = get("auto", lambda r: r.get("budget_bits") == 4.5 and r.get("estimator") == "estimated")
            a35 = get("auto", lambda r: r.get("budget_bits") == 3.5 and r.get("estimator") == "estimated")
            ah = get("auto-heuristic-size", lambda r: True)
            if uni4 and a45:
                red = 100 * (1 - a45["kl"] / uni4["kl"])
                rows.append([name, method.upper(), "auto 4.5 bits: KL >= 30% below uniform int4-g128",
                             f"{a45['kl']:.4f} vs {uni4['kl']:.4f} ({red:.0f}% lower)", "met" if red >= 30 else "not met"])
            if heur and ah:
                rows.append([name, method.upper(), "auto at the heuristic's bytes: KL below first+last int8",
                             f"{ah['kl']:.4f} vs {heur['kl']:.4f} ({ah['block_bits']:.3f} bits)",
                             "met" if ah["kl"] < heur["kl"] else "not met"])
            if uni3 and a35:
                rows.append([name, method.upper(), "auto 3.5 bits: perplexity below uniform int3-g64",
                             f"{a35['ppl']:.2f} vs {uni3['ppl']:.2f}", "met" if a35["ppl"] < uni3["ppl"] else "not met"])
    return _table(["model", "method", "goal", "measured", "status"], rows)


def auto_mnist() -> str | None:
    d = _load("auto_mnist")
    if d is None:
        return None
    out = []
    for s in sorted(d["strategies"], key=lambda s: s["bits_per_weight"]):
        layers = ", ".join(f"{r['path'].split('/')[-2]} {r['choice']}" for r in s.get("layers", []))
        out.append([s["name"], f"{s['bits_per_weight']:.3f}", f"{100 * s['accuracy']:.2f}%", layers or "-",
                    _f(s.get("sensitivity_s"), ".1f")])
    cap = (f"MNIST MLP 784-128-10 through `jaxq run {d['recipe']}` (float {100 * d['float_accuracy']:.2f}%); "
           f"bits per weight over the kernels, scales included. {d['machine']}; measured {d['date']}.")
    return cap + "\n\n" + _table(["strategy", "bits/weight", "test accuracy", "per-layer formats", "sensitivity s"], out)


RENDERERS: dict[str, Callable[[], str | None]] = {
    "lm_quality": lambda: lm_quality(True),
    "lm_quality_short": lambda: lm_quality(False),
    "lm_quality_goals": lm_quality_goals,
    "lm_decode": lambda: lm_decode(True),
    "lm_load_memory": lambda: lm_load_memory(True),
    "lm_auto": lambda: lm_auto(True),
    "lm_auto_short": lambda: lm_auto(False),
    "lm_auto_goals": lm_auto_goals,
    "auto_mnist": auto_mnist,
}

_MARK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def render(text: str, missing: list[str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        fn = RENDERERS.get(name)
        body = fn() if fn else None
        if body is None:
            missing.append(name)
            return m.group(0)
        return m.group(1) + body + "\n" + m.group(4)

    return _MARK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="report out-of-date files instead of writing them")
    args = ap.parse_args(argv)
    stale = []
    for f in FILES:
        missing: list[str] = []
        old = f.read_text()
        new = render(old, missing)
        for m in missing:
            print(f"{f.name}: no results for table {m!r} (run its benchmark)", file=sys.stderr)
        if new != old:
            stale.append(f.name)
            if not args.check:
                f.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/render_tables.py", file=sys.stderr)
        return 1
    if not args.check:
        print(f"updated: {', '.join(stale) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
