"""Quality of post-training quantization on real small language models: jaxq vs Qwix.

Models:

* **TinyStories-656K** (the real pretrained Llama, ``$JAXQ_DATA_DIR/tinystories_656k``).
  Held-out text: the 84 short stories in ``benchmarks/tinystories_heldout.txt`` (about 11k
  tokens), written for this benchmark in the TinyStories style (no TinyStories text ships with
  the data folder), so the model has never seen them. Calibration: sequences sampled from the float model itself (temperature 1,
  fixed seed) - data-free calibration, disjoint from the evaluation text.
* **char-GPT on Tiny Shakespeare** (:mod:`jaxq.models.char_gpt`), trained here on the first 90%
  of the text (cached under ``--cache-dir``); held-out = the last 10% (up to 512 windows of 128
  characters); calibration = random windows of the training part.

Rows: float; W8A8 (int8 per-channel weights, dynamic per-token int8 activations) RTN vs
SmoothQuant; W4A16 with groups of 128/64/32 RTN vs MSE clip vs GPTQ vs AWQ; W3A16 g64 RTN vs
GPTQ (and AWQ); and the same settings through ``qwix.contrib`` where Qwix 0.1.8 has them
(PTQ, GPTQ, AWQ, SmoothQuant; int3 as its synthetic ``"int3"`` type in an int4 container). Columns: perplexity on the held-out text, mean
KL(float || quantized) of the next-token distribution, top-1 agreement with float, bytes of the
parameter tree (embeddings and LM head stay float everywhere), and wall time to quantize
(CPU, including JIT compilation, calibration forwards included).

How each row is evaluated:

* jaxq W8A8: the model runs with ``dense_kwargs`` = :mod:`jaxq.flax.hooks` on int8 QArray
  kernels whose metadata asks for per-token int8 activations, i.e. a real int8 x int8 -> int32
  ``dot_general`` (not a simulation).
* jaxq weight-only (W4/W3): the model runs on the quantized tree itself (packed int4 / int3
  QArrays): the models' Dense is :class:`jaxq.flax.linen.Dense`, which serves QArray kernels
  through :func:`jaxq.ops.qmatmul`.
* Qwix: its own providers (``PtqProvider``, ``AwqInferenceProvider``, ``SqInferenceProvider``)
  intercepting the same Flax model.

For W8A8 rows the note says how many ``dot_general`` ops of the evaluated model really take
int8 x int8 operands (read from its jaxpr): jaxq quantizes the 7 Dense matmuls per block; Qwix's
PTQ rule also quantizes the attention einsums, and its SmoothQuant inference provider runs only
the matmuls it smoothed as int8 x int8 (check the count before comparing those rows).

jaxq's calibrated methods run block by block (:mod:`jaxq.algorithms.sequential`, quantized
outputs fed forward, true-sequential within a block, AWQ/SmoothQuant scales folded into the
preceding norm or Dense). jaxq's GPTQ uses act-order with static groups whose scales come from
the MSE clip search (``Recipe.gptq_mse``) and fits the float model's layer outputs
(``Recipe.gptq_float_target``), both on by default; its AWQ searches plain and weight-aware
scales, then clip ratios. Symmetric int4/int3 use the full-range grid
(``[-8, 7]`` / ``[-4, 3]``) in both libraries; the "narrow grid" rows show jaxq with ``[-7, 7]``.
Qwix calibrates all layers in one float forward pass; its GPTQ has no act-order and its
AWQ/SmoothQuant keep the scales as separate tensors applied at inference.

Usage::

    JAXQ_DATA_DIR=/work/shared/data python benchmarks/llm_quality.py [--models tinystories chargpt]
        [--no-qwix] [--qwix-gptq-groups 128] [--out results.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxq.algorithms.sequential import Recipe, quantize_model  # noqa: E402
from jaxq.flax import hooks  # noqa: E402
from jaxq.models.lm_eval import kl_and_top1, token_nll  # noqa: E402
from jaxq.spec import QuantSpec  # noqa: E402

HELD_OUT_FILE = Path(__file__).resolve().parent / "tinystories_heldout.txt"


def held_out_stories() -> list[str]:
    """The held-out TinyStories-style text: one story per line of :data:`HELD_OUT_FILE`."""
    return [line.strip() for line in HELD_OUT_FILE.read_text().splitlines() if line.strip()]

Params = Any


@dataclasses.dataclass
class Setup:
    """A model with its float params, calibration tokens and held-out token windows."""

    name: str
    model: Any
    params: Params
    calib: jax.Array
    eval_windows: jax.Array


# --- data ---------------------------------------------------------------------------------
def _sample_from_model(model, params, n: int, length: int, bos: int, seed: int) -> jax.Array:
    """Ancestral samples (temperature 1) from the float model, starting at BOS."""

    @jax.jit
    def step(toks, t, key):
        logits = model.apply({"params": params}, toks)
        nxt = jax.random.categorical(key, jnp.take(logits, t - 1, axis=1))
        return toks.at[:, t].set(nxt)

    toks = jnp.zeros((n, length), jnp.int32).at[:, 0].set(bos)
    key = jax.random.key(seed)
    for t in range(1, length):
        toks = step(toks, t, jax.random.fold_in(key, t))
    return toks


def tinystories_setup(n_calib: int, calib_len: int, window: int, seed: int = 0) -> Setup:
    from jaxq.models import Llama, load_tinystories

    cfg, params, tok = load_tinystories()
    model = Llama(cfg)
    stream: list[int] = []
    for story in held_out_stories():
        stream += tok.encode(story).ids + [cfg.eos_token_id]  # encode prepends BOS
    n = len(stream) // window
    eval_windows = jnp.asarray(np.array(stream[: n * window], np.int32).reshape(n, window))
    calib = _sample_from_model(model, params, n_calib, calib_len, cfg.bos_token_id, seed=seed)
    return Setup("TinyStories-656K (Llama)", model, params, calib, eval_windows)


def chargpt_setup(n_calib: int, calib_len: int, window: int, cache_dir: Path, steps: int, seed: int = 0) -> Setup:
    from jaxq.data.text import CharTokenizer, load_tiny_shakespeare
    from jaxq.models import CharGPT, CharGPTConfig, train_char_gpt

    text = load_tiny_shakespeare()
    tok = CharTokenizer.from_text(text)
    split = int(0.9 * len(text))
    train, held = text[:split], text[split:]
    cfg = CharGPTConfig(vocab_size=tok.vocab_size, context_length=window, num_layers=2, hidden_size=128, num_heads=4)
    model = CharGPT(cfg)
    cache = cache_dir / f"chargpt_l{cfg.num_layers}_d{cfg.hidden_size}_c{cfg.context_length}_s{steps}.npz"
    if cache.is_file():
        flat = dict(np.load(cache))
        params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
        print(f"char-GPT: loaded {cache}", flush=True)
    else:
        t0 = time.perf_counter()
        params = train_char_gpt(train, cfg, steps=steps, batch=32, lr=3e-3, seed=0, tokenizer=tok, progress=False)
        print(f"char-GPT: trained {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
        np.savez(cache, **{"/".join(k): np.asarray(v) for k, v in flat.items()})
    held_ids = np.asarray(tok.encode(held), np.int32)
    n = min(512, len(held_ids) // window)
    eval_windows = jnp.asarray(held_ids[: n * window].reshape(n, window))
    train_ids = np.asarray(tok.encode(train), np.int32)
    starts = np.random.default_rng(seed).integers(0, len(train_ids) - calib_len, n_calib)
    calib = jnp.asarray(np.stack([train_ids[s : s + calib_len] for s in starts]))
    return Setup("char-GPT (Tiny Shakespeare)", model, params, calib, eval_windows)


# --- evaluation ---------------------------------------------------------------------------
def _logits_fn(model) -> Callable[[Params, jax.Array], jax.Array]:
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def metrics(logits: jax.Array, ref_logits: jax.Array, tokens: jax.Array) -> tuple[float, float, float]:
    """Perplexity on ``tokens``, mean KL(float || q), top-1 agreement."""
    ppl = float(jnp.exp(jnp.mean(token_nll(logits, tokens))))
    kl, top1 = kl_and_top1(ref_logits[:, :-1], logits[:, :-1])
    return ppl, float(kl), float(top1)


def int8_dots(fn: Callable[..., Any], *args: Any) -> str:
    """``"a/b"``: how many of the ``b`` ``dot_general`` ops in ``fn``'s jaxpr take int8 x int8."""
    n_int8 = n_all = 0

    def walk(jaxpr):
        nonlocal n_int8, n_all
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                n_all += 1
                n_int8 += all(str(v.aval.dtype) == "int8" for v in e.invars)
            for v in e.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return f"{n_int8}/{n_all}"


def _leaf_bytes(x: Any) -> float:
    dt = np.dtype(x.dtype)
    bits = jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else 8 * dt.itemsize
    return x.size * bits / 8


def tree_bytes(tree: Params) -> int:
    """Storage bytes of every leaf; jaxq QArrays count their packed codes + scales, sub-byte
    dtypes (Qwix int4) count 4 bits per element."""
    total = 0.0
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "dtype") and hasattr(leaf, "size"):
            total += _leaf_bytes(leaf)
    return int(total)


@dataclasses.dataclass
class Row:
    setting: str
    method: str
    lib: str
    ppl: float | None = None
    kl: float | None = None
    top1: float | None = None
    nbytes: int | None = None
    block_bytes: int | None = None
    seconds: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        return [self.setting, self.method, self.lib, f(self.ppl, ".3f"), f(self.kl, ".4f"), f(self.top1, ".3f"),
                "-" if self.block_bytes is None else f"{self.block_bytes / 1024:.0f}",
                "-" if self.nbytes is None else f"{self.nbytes / 1024:.0f}", f(self.seconds, ".1f"), self.note]


HEADERS = ["setting", "method", "library", "ppl", "KL vs float", "top-1 agree", "blocks KiB", "total KiB", "quantize s", "note"]


def block_bytes(tree: Params) -> int:
    """Bytes of the transformer blocks only (``layers_*``: what is quantized)."""
    return sum(tree_bytes(v) for k, v in tree.items() if str(k).startswith("layers_"))


def jaxq_rows(setup: Setup, ref: jax.Array, settings) -> list[Row]:
    model = setup.model
    float_fn = _logits_fn(model)
    w8a8_model = model.clone(dense_kwargs=flax.core.FrozenDict(dot_general=hooks.dot_general, promote_dtype=hooks.promote_dtype))
    w8a8_fn = _logits_fn(w8a8_model)
    rows = []
    for setting, method, recipe in settings:
        t0 = time.perf_counter()
        qparams, _ = quantize_model(model, setup.params, setup.calib, recipe, batch_size=8)
        jax.block_until_ready(qparams)
        dt = time.perf_counter() - t0
        note = ""
        if recipe.act_spec is not None:
            logits = w8a8_fn(qparams, setup.eval_windows)
            note = f"int8xint8 dots {int8_dots(w8a8_fn, qparams, setup.eval_windows[:1])}"
        else:
            logits = float_fn(qparams, setup.eval_windows)  # packed QArrays, served as such
        ppl, kl, top1 = metrics(logits, ref, setup.eval_windows)
        rows.append(Row(setting, method, "jaxq", ppl, kl, top1, tree_bytes(qparams), block_bytes(qparams), dt, note))
        print(" | ".join(rows[-1].cells()), flush=True)
    return rows


def qwix_method(method: str):
    """``(rule class, calibration provider, params quantizer, inference provider)`` of a Qwix method."""
    import qwix
    from qwix.contrib import awq as qawq
    from qwix.contrib import gptq as qgptq
    from qwix.contrib import smooth_quant as qsq

    return {
        "RTN": (qwix.QuantizationRule, None, None, qwix.PtqProvider),
        "GPTQ": (qgptq.GptqRule, qgptq.GptqCalibrationProvider, qgptq.quantize_params, qwix.PtqProvider),
        "AWQ": (qawq.AwqRule, qawq.AwqCalibrationProvider, qawq.quantize_params, qawq.AwqInferenceProvider),
        "SmoothQuant": (qsq.SqRule, qsq.SqCalibrationProvider, qsq.quantize_params, qsq.SqInferenceProvider),
    }[method]


def qwix_rows(setup: Setup, ref: jax.Array, settings, gptq_groups: set[int]) -> list[Row]:
    import qwix

    model, params = setup.model, setup.params
    rows = []
    for setting, method, kw in settings:
        group = kw.get("tile_size")
        if method == "GPTQ" and kw["weight_qtype"] != "int3" and (group or 0) not in gptq_groups:
            rows.append(Row(setting, method, "qwix", note="skipped (slow on CPU; --qwix-gptq-groups)"))
            continue
        rule_cls, cal_cls, qfn, infer = qwix_method(method)
        rule = rule_cls(module_path=r"layers_\d+/.*", **kw)
        t0 = time.perf_counter()
        qm = qwix.quantize_model(model, infer([rule]))
        # The abstract quantized tree must come from PtqProvider: the SQ/AWQ inference providers
        # replace its dot_general, so their own init leaves the kernels float (nothing quantized).
        ptq_model = qwix.quantize_model(model, qwix.PtqProvider([rule]))
        try:
            abs_q = jax.eval_shape(ptq_model.init, jax.random.key(0), setup.calib[:1])["params"]
            if cal_cls is None:
                qp = qwix.quantize_params(params, abs_q)
            else:
                cm = qwix.quantize_model(model, cal_cls([rule]))
                _, state = cm.apply({"params": params}, setup.calib, mutable=["quant_stats"])
                qp = qfn(params, abs_q, state["quant_stats"])
            jax.block_until_ready(qp)
        except Exception as e:  # noqa: BLE001  (report what Qwix does not support)
            rows.append(Row(setting, method, "qwix", note=f"fails: {type(e).__name__}: {str(e)[:60]}"))
            print(" | ".join(rows[-1].cells()), flush=True)
            continue
        dt = time.perf_counter() - t0
        qfn_apply = lambda p, t: qm.apply({"params": p}, t)  # noqa: E731
        logits = jax.jit(qfn_apply)(qp, setup.eval_windows)
        ppl, kl, top1 = metrics(logits, ref, setup.eval_windows)
        note = f"int8xint8 dots {int8_dots(qfn_apply, qp, setup.eval_windows[:1])}" if "act_qtype" in kw else ""
        rows.append(Row(setting, method, "qwix", ppl, kl, top1, tree_bytes(qp), block_bytes(qp), dt, note))
        print(" | ".join(rows[-1].cells()), flush=True)
    return rows


def settings(groups: list[int]):
    """(setting, method, Recipe) for jaxq and (setting, method, rule kwargs) for Qwix."""
    j = [
        ("W8A8", "RTN", Recipe("rtn", "int8", act_spec="int8")),
        ("W8A8", "SmoothQuant a=0.5", Recipe("smoothquant", "int8", alpha=0.5)),
    ]
    q = [
        ("W8A8", "RTN", dict(weight_qtype=jnp.int8, act_qtype=jnp.int8)),
        ("W8A8", "SmoothQuant", dict(weight_qtype=jnp.int8, act_qtype=jnp.int8)),
    ]
    for g in groups:
        s = f"W4A16 g{g}"
        spec = f"int4-g{g}"
        j += [(s, "RTN", Recipe("rtn", spec)), (s, "MSE clip", Recipe("mse", spec)),
              (s, "GPTQ", Recipe("gptq", spec)), (s, "AWQ", Recipe("awq", spec))]
        if g == 128:  # what the full-range grid (jaxq's default at <= 4 bits) buys over [-7, 7]
            narrow = QuantSpec("int4", "per_group", group_size=g, full_range=False)
            j += [(s, "RTN, narrow grid", Recipe("rtn", narrow)), (s, "GPTQ, narrow grid", Recipe("gptq", narrow))]
        q += [(s, m, dict(weight_qtype=jnp.int4, tile_size=g)) for m in ("RTN", "GPTQ", "AWQ")]
    s = "W3A16 g64"
    j += [(s, "RTN", Recipe("rtn", "int3-g64")), (s, "GPTQ", Recipe("gptq", "int3-g64")), (s, "AWQ", Recipe("awq", "int3-g64"))]
    asym = QuantSpec("int3", "per_group", group_size=64, symmetric=False)  # zero point instead of a symmetric grid
    j += [(s + " asym", "RTN", Recipe("rtn", asym)), (s + " asym", "GPTQ", Recipe("gptq", asym))]
    q += [(s, m, dict(weight_qtype="int3", tile_size=64)) for m in ("RTN", "GPTQ", "AWQ")]  # Qwix: synthetic int3 in int4
    return j, q


def run(setup: Setup, groups: list[int], use_qwix: bool, gptq_groups: set[int], only: str | None = None) -> list[Row]:
    print(f"\n## {setup.name}: calib {tuple(setup.calib.shape)}, eval {tuple(setup.eval_windows.shape)}", flush=True)
    ref = _logits_fn(setup.model)(setup.params, setup.eval_windows)
    ppl = float(jnp.exp(jnp.mean(token_nll(ref, setup.eval_windows))))
    rows = [Row("float32", "-", "-", ppl, 0.0, 1.0, tree_bytes(setup.params), block_bytes(setup.params), 0.0)]
    jset, qset = settings(groups)
    if only:
        keep = lambda s, m: re.search(only, f"{s} {m}") is not None  # noqa: E731
        jset = [x for x in jset if keep(x[0], x[1])]
        qset = [x for x in qset if keep(x[0], x[1])]
    rows += jaxq_rows(setup, ref, jset)
    if use_qwix:
        rows += qwix_rows(setup, ref, qset, gptq_groups)
    return rows


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import machine_line, markdown_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tinystories", "chargpt"], choices=["tinystories", "chargpt"])
    ap.add_argument("--groups", nargs="+", type=int, default=[128, 64, 32])
    ap.add_argument("--no-qwix", action="store_true")
    ap.add_argument("--qwix-gptq-groups", nargs="*", type=int, default=[128],
                    help="group sizes for which to run Qwix's GPTQ (about 5 min each on 2 CPU cores)")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration sample (the model is fixed)")
    ap.add_argument("--chargpt-steps", type=int, default=800)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxq-bench")
    ap.add_argument("--only", default=None, help="regex on '<setting> <method>' selecting rows, e.g. 'W8A8'")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = ap.parse_args(argv)

    out = [f"# LLM quantization quality\n\n{machine_line()}\n"]
    for name in args.models:
        if name == "tinystories":
            setup = tinystories_setup(args.n_calib, args.calib_len, window=128, seed=args.calib_seed)
        else:
            setup = chargpt_setup(args.n_calib, args.calib_len, 128, args.cache_dir, args.chargpt_steps, seed=args.calib_seed)
        rows = run(setup, args.groups, not args.no_qwix, set(args.qwix_gptq_groups), args.only)
        table = markdown_table(HEADERS, [r.cells() for r in rows])
        out.append(f"## {setup.name}\n\ncalibration {tuple(setup.calib.shape)} tokens, held-out {tuple(setup.eval_windows.shape)}\n\n{table}\n")
        print("\n" + table, flush=True)
    if args.out:
        args.out.write_text("\n".join(out))


if __name__ == "__main__":
    main()
