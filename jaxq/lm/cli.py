"""``jaxq lm generate | quantize | eval``: real language models from the command line.

::

    jaxq lm generate MODEL --prompt "The capital of France is" [--max-new-tokens 32] [--kv-cache int8]
    jaxq lm quantize MODEL --out OUT [--method gptq] [--weights int4] [--group-size 128]
                     [--activations int8] [--calib FILE] [--calib-tokens 8192] [--format jaxq|gguf]
    jaxq lm quantize MODEL --out OUT --budget-bits 4.5 [--candidates int8,int4-g128,int3-g64]
                     [--sensitivity estimated|measured] [--report auto.json]
    jaxq lm eval MODEL --text FILE [--reference MODEL] [--json OUT] [--kv-cache int8]

``MODEL`` is a Hugging Face folder, a ``.gguf`` file or a jaxq checkpoint from ``jaxq lm quantize``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from jaxq.models.kv_cache import KV_KINDS

METHODS = ("rtn", "mse", "gptq", "awq", "smoothquant")
WEIGHTS = ("int8", "int4", "int3", "int2", "nf4", "fp8")
AUTO_CANDIDATES = ("bf16", "int8", "int4-g32", "int4-g128", "int3-g64", "int2-g32")
GGUF_CANDIDATES = ("q8_0", "q4_0", "q4_1")


def add_parser(sub: Any) -> None:
    """Adds the ``lm`` command and its subcommands to the top-level parser's subparsers."""
    lp = sub.add_parser("lm", help="language models: generate, quantize, eval (HF folders, GGUF, jaxq)")
    lsub = lp.add_subparsers(dest="lm_command", required=True, metavar="{generate,quantize,eval}")

    g = lsub.add_parser("generate", help="print the continuation of a prompt")
    g.add_argument("model")
    g.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--kv-cache", choices=KV_KINDS, default="float")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template "
                                                       "(<|im_start|> style)")

    q = lsub.add_parser("quantize", help="quantize block by block and write a jaxq checkpoint or a GGUF file")
    q.add_argument("model")
    q.add_argument("--out", required=True, help="output file (.jaxq or .gguf)")
    q.add_argument("--method", choices=METHODS, default="gptq")
    q.add_argument("--weights", choices=WEIGHTS, help="weight format for every kernel (default int4)")
    q.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
    q.add_argument("--asymmetric", action="store_true", help="asymmetric weights (with a zero point)")
    q.add_argument("--activations", choices=("int8",), help="W8A8: dynamic per-token int8 activations")
    q.add_argument("--calib", help="calibration text file (default: a small embedded sample)")
    q.add_argument("--calib-tokens", type=int, default=8192)
    q.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    q.add_argument("--format", choices=("jaxq", "gguf"), default=None,
                   help="output format (default: from the --out suffix; gguf needs int8 or int4 in groups of 32)")
    q.add_argument("--budget-bits", type=float,
                   help="choose every kernel's format automatically: average bits per weight over the block "
                        "kernels, scales included (methods rtn, mse, gptq)")
    q.add_argument("--candidates", help="formats a kernel may take with --budget-bits, comma-separated "
                                        f"(default {','.join(AUTO_CANDIDATES)}; 'float' keeps a kernel)")
    q.add_argument("--sensitivity", choices=("estimated", "measured"), default="estimated",
                   help="per-kernel sensitivity for --budget-bits: Fisher estimate (one backward pass per "
                        "window) or measured KL (one forward pass per kernel and candidate)")
    q.add_argument("--report", help="with --budget-bits: write the per-kernel choices and sensitivities as JSON")
    q.add_argument("--quiet", "-q", action="store_true")

    e = lsub.add_parser("eval", help="perplexity (and KL / top-1 against a reference model)")
    e.add_argument("model")
    e.add_argument("--text", required=True, help="text file to score")
    e.add_argument("--reference", help="reference model (e.g. the float one) for KL and top-1 agreement")
    e.add_argument("--json", help="write the metrics to this JSON file")
    e.add_argument("--window", type=int, default=256)
    e.add_argument("--max-windows", type=int)
    e.add_argument("--kv-cache", choices=KV_KINDS, default="float")


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    return p.read_text(encoding="utf-8")


def _log(msg: str) -> None:
    print(f"[jaxq] {msg}", file=sys.stderr, flush=True)


def _choice_counts(report: Any) -> str:
    counts: dict[str, int] = {}
    for r in report.layers:
        counts[r.choice] = counts.get(r.choice, 0) + 1
    return ", ".join(f"{n} x {c}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def run(args: argparse.Namespace) -> int:
    """Runs a parsed ``jaxq lm`` command. Returns the exit status."""
    import jaxq.lm as L

    if args.lm_command == "generate":
        lm = L.load(args.model)
        prompts = [_chat(p) if args.chat else p for p in args.prompt]
        outs = L.generate(lm, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, kv_cache=args.kv_cache)
        for p, o in zip(args.prompt, outs):
            print(f"{p}{o}" if not args.chat else o)
        return 0

    if args.lm_command == "quantize":
        from jaxq.algorithms.sequential import Recipe

        fmt = args.format or ("gguf" if args.out.endswith(".gguf") else "jaxq")
        auto = args.budget_bits is not None
        if auto:
            if args.weights is not None or args.activations is not None:
                raise ValueError("--budget-bits chooses each kernel's format from --candidates; drop --weights "
                                 "and --activations")
            if args.method not in ("rtn", "mse", "gptq"):
                raise ValueError(f"--budget-bits works with --method rtn, mse or gptq, not {args.method}")
            candidates = tuple(c.strip() for c in (args.candidates or ",".join(
                GGUF_CANDIDATES if fmt == "gguf" else AUTO_CANDIDATES)).split(",") if c.strip())
            if fmt == "gguf" and not set(candidates) <= set(GGUF_CANDIDATES):
                raise ValueError(f"--format gguf with --budget-bits needs candidates among {','.join(GGUF_CANDIDATES)} "
                                 f"(the layouts GGUF stores), got {','.join(candidates)}")
            spec = None
        else:
            if args.candidates or args.report:
                raise ValueError("--candidates and --report go with --budget-bits")
            spec = L.weight_spec(args.weights or "int4", args.group_size or None, symmetric=not args.asymmetric,
                                 target=fmt)
        out_dir = Path(args.out).resolve().parent
        if not out_dir.is_dir():
            raise FileNotFoundError(f"cannot write {args.out}: folder {out_dir} does not exist")
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"cannot write {args.out}: folder {out_dir} is not writable")
        t0 = time.perf_counter()
        lm = L.load(args.model)
        text = None if args.calib is None else _read_text(args.calib)
        tokens = L.calibration_tokens(lm, text, num_tokens=args.calib_tokens, seq_len=args.seq_len)
        if not args.quiet:
            _log(f"loaded {args.model} ({lm.config.arch}, {lm.config.num_layers} blocks) in "
                 f"{time.perf_counter() - t0:.1f} s; calibrating on {tokens.size} tokens")
        if fmt == "gguf":  # refuse what GGUF cannot carry before spending the calibration time
            from jaxq.lm.gguf_tokenizer import tokenizer_metadata

            tokenizer_metadata(lm.tokenizer, lm.config)
        if auto:
            from jaxq.algorithms.auto_policy import BitsPerWeight

            policy, report = L.lm_auto_policy(lm, BitsPerWeight(args.budget_bits), candidates=candidates,
                                              calib_tokens=tokens, estimator=args.sensitivity,
                                              progress=not args.quiet)
            if not args.quiet:
                _log(f"auto policy: {report.bits_per_weight:.3f} bits per weight ({args.sensitivity} sensitivity, "
                     f"{report.seconds['sensitivity']:.1f} s); formats: {_choice_counts(report)}")
            if args.report:
                Path(args.report).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
            recipe = Recipe(method=args.method, policy=policy, fit_groups=True)
        else:
            recipe = Recipe(method=args.method, spec=spec, act_spec=args.activations, fit_groups=True)
        qlm, _ = L.quantize_lm(lm, recipe, calib_tokens=tokens, progress=not args.quiet)
        if fmt == "gguf":
            L.save_gguf(qlm, args.out)
        else:
            L.save(qlm, args.out)
        what = (f"auto under {args.budget_bits} bits" if auto else
                f"{spec.format}{f' g{spec.group_size}' if spec.group_size else ''}")
        print(f"wrote {args.out}: {qlm.nbytes / 2**20:.1f} MiB, {qlm.bits_per_weight():.2f} bits per weight "
              f"({args.method}, {what}), {time.perf_counter() - t0:.1f} s")
        return 0

    if args.lm_command == "eval":
        lm = L.load(args.model)
        ref = None if args.reference is None else L.load(args.reference)
        res = L.evaluate(lm, _read_text(args.text), reference=ref, window=args.window,
                         max_windows=args.max_windows, kv_cache=args.kv_cache)
        res["model"] = args.model
        res["reference"] = args.reference
        line = f"ppl {res['ppl']:.4f} over {res['tokens']} tokens"
        if ref is not None:
            line += f"; KL {res['kl']:.5f}; top-1 {100 * res['top1']:.2f}%"
        line += f"; {res['bytes'] / 2**20:.1f} MiB, {res['bits_per_weight']:.3f} bits per weight"
        print(line)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        return 0
    raise AssertionError(args.lm_command)
