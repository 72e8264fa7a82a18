"""Generation with the KV cache, sampling, quantized caches, LM checkpoints and the block driver on
every architecture (random-init HF checkpoints from :mod:`lm_reference`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import jaxq  # noqa: E402
import jaxq.lm  # noqa: E402
from jaxq.algorithms import protocol as P  # noqa: E402
from jaxq.algorithms import sequential  # noqa: E402
from jaxq.algorithms.sequential import Recipe  # noqa: E402
from jaxq.io import CheckpointError  # noqa: E402
from jaxq.lm.generate import generate_ids, sample_logits, to_left_padded  # noqa: E402
from jaxq.models.generate import _greedy_loop  # noqa: E402
from jaxq.models.kv_cache import cache_bytes  # noqa: E402

from lm_reference import FAMILIES, make_checkpoint  # noqa: E402

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    out = {}
    for fam in ARCHS:
        folder = make_checkpoint(tmp_path_factory.mktemp(fam), fam, seed=1)
        out[fam] = jaxq.lm.load(folder)
    return out


def _recompute_greedy(lm, ids, new):
    n = len(ids)
    buf = jnp.zeros((1, n + new), jnp.int32).at[0, :n].set(jnp.asarray(ids, jnp.int32))
    out = _greedy_loop(lm.module, lm.params, buf, jnp.int32(n), window=n + new, num_new=new)
    return np.asarray(out[0, n:]).tolist()


PROMPTS = [[5, 17, 33, 8, 40, 61, 12, 9, 70, 3, 44, 21], [7, 8], [90, 11, 11, 4, 60]]


@pytest.mark.parametrize("fam", ARCHS)
def test_kv_cache_greedy_equals_full_recompute(lms, fam):
    """Float cache, a batch of three prompts of different lengths (left-padded): every row equals
    greedy decoding by full recomputation, token for token (Gemma: the 12-token prompt is longer
    than the sliding window of 4)."""
    lm = lms[fam]
    got = generate_ids(lm, PROMPTS, 10, stop_at_eos=False, bucket=8)
    for ids, row in zip(PROMPTS, got):
        assert row == _recompute_greedy(lm, ids, 10)


def test_batch_equals_single_and_right_padding(lms):
    lm = lms["qwen2"]
    batch = generate_ids(lm, PROMPTS, 8, stop_at_eos=False)
    singles = [generate_ids(lm, [p], 8, stop_at_eos=False)[0] for p in PROMPTS]
    assert batch == singles
    # A right-padded batch (pads after the prompt) gives the same rows once converted.
    padded = np.zeros((3, 12), np.int32)
    for i, p in enumerate(PROMPTS):
        padded[i, :len(p)] = p
    rows = to_left_padded(padded, [len(p) for p in PROMPTS], "right")
    assert rows == PROMPTS
    assert generate_ids(lm, rows, 8, stop_at_eos=False) == batch
    with pytest.raises(ValueError, match="padding_side"):
        to_left_padded(padded, [1, 1, 1], "middle")


def test_stop_at_eos(lms):
    lm = lms["llama"]
    free = generate_ids(lm, [PROMPTS[0]], 8, stop_at_eos=False)[0]
    eos = free[3]
    cut = generate_ids(lm.replace(config=lm.config.__class__(**{**lm.config.__dict__, "eos_token_ids": (eos,)})),
                       [PROMPTS[0]], 8)[0]
    assert cut == free[: free.index(eos) + 1]


def test_sampling_is_seeded_and_restricted():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)
    key = jax.random.key(3)
    a = sample_logits(logits, key, 1.0, None, None)
    assert np.array_equal(a, sample_logits(logits, key, 1.0, None, None))
    greedy = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(sample_logits(logits, key, 0.0, None, None), greedy)
    np.testing.assert_array_equal(sample_logits(logits, key, 1.0, 1, None), greedy)
    np.testing.assert_array_equal(sample_logits(logits, key, 1.0, None, 1e-6), greedy)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    for s in range(100):
        t = np.asarray(sample_logits(logits, jax.random.key(s), 1.0, 3, None))
        assert all(t[i] in top3[i] for i in range(4))
    # top_p: the kept set is the smallest prefix (by probability) whose mass reaches p.
    p = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-p)
    k = int(np.searchsorted(np.cumsum(p[order]), 0.7) + 1)
    allowed = set(order[:k].tolist())
    for s in range(100):
        assert int(sample_logits(logits[:1], jax.random.key(s), 1.0, None, 0.7)[0]) in allowed


def test_generate_text_and_argument_errors(lms):
    lm = lms["llama"]
    out = jaxq.lm.generate(lm, ["a b", "c"], 5, temperature=0.8, top_k=5, seed=2)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert out == jaxq.lm.generate(lm, ["a b", "c"], 5, temperature=0.8, top_k=5, seed=2)
    for kw, msg in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                    (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"), (dict(kv_cache="int4"), "kv_cache")]:
        args = dict(max_new_tokens=3) | kw
        with pytest.raises(ValueError, match=msg):
            generate_ids(lm, [[1, 2]], args.pop("max_new_tokens"), **args)


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("fp8", 0.2)])
def test_quantized_kv_cache(lms, kind, tol):
    """Codes + one float32 scale per token and KV head; logits close to the float cache's."""
    lm = lms["llama3"]
    c = lm.config
    ids = jnp.asarray([PROMPTS[0]])
    module = lm.module
    cache = module.init_cache(1, 16, kind)
    assert cache.nbytes == cache_bytes(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim, kind)
    assert cache.nbytes * 4 * c.head_dim == cache_bytes(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim, "float") * (c.head_dim + 4)
    logits, cache = module.apply({"params": lm.params}, ids, cache=cache)
    ref = lm(ids)
    err = float(jnp.max(jnp.abs(logits - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < err < tol
    k = cache.layers[0].k
    assert k.dtype == (jnp.int8 if kind == "int8" else jnp.float8_e4m3fn)
    # Stored codes reproduce keys to within half a step of each token-head's scale.
    s = cache.layers[0].k_scale[0, :12]
    assert s.shape == (12, c.num_kv_heads, 1)


def test_lm_checkpoint_round_trip(lms, tmp_path):
    lm = lms["gemma2"]
    q = lm.replace(params=jaxq.quantize(lm.params, "int4-g32"))
    path = tmp_path / "m.jaxq"
    jaxq.lm.save(q, path)
    back = jaxq.lm.load(path)
    assert back.config == q.config
    assert back.tokenizer.encode("a b c").ids == q.tokenizer.encode("a b c").ids
    ids = jnp.asarray([PROMPTS[0]])
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(q(ids)))
    # A jaxq checkpoint of a plain tree is not an LM; a damaged file is refused.
    jaxq.save(tmp_path / "tree.jaxq", {"a": jnp.ones(3)})
    with pytest.raises(CheckpointError, match="not of a language model"):
        jaxq.lm.load(tmp_path / "tree.jaxq")
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    (tmp_path / "bad.jaxq").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError):
        jaxq.lm.load(tmp_path / "bad.jaxq")


def test_load_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        jaxq.lm.load(tmp_path / "nothing")
    (tmp_path / "x.bin").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a GGUF file"):
        jaxq.lm.load(tmp_path / "x.bin")


# --- the block driver on every architecture ------------------------------------------------
def _block_out(lm, i, bp, h):
    return P.apply_block(lm.module.block_module(i), bp, h)


@pytest.mark.parametrize("fam", ARCHS)
def test_scale_folds_are_exact(lms, fam):
    """Folding a scale into each group's norm or Dense (AWQ / SmoothQuant) leaves the block's output
    unchanged: checks the layouts, Gemma's (1 + w) norm fold and the GQA tie on every family."""
    lm = lms[fam]
    module = lm.module
    h = P.embed(module, lm.params, jnp.asarray([PROMPTS[0]]))
    rng = np.random.default_rng(0)
    for i in range(lm.config.num_layers):
        bp = sequential._copy_tree(P.block_params(lm.params, i))
        ref = _block_out(lm, i, bp, h)
        for g in module.block_layout(i):
            k = bp[g.denses[0][0]][g.denses[0][1]]["kernel"].shape[0]
            s = jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32)
            tie = g.tie(k)
            if tie is not None:
                s = s[np.asarray(tie)]  # tied channels share one scale
            sequential._apply_scale(bp, g, s)
        np.testing.assert_allclose(_block_out(lm, i, bp, h), ref, rtol=2e-4, atol=2e-5)


def _kl(lm, qlm, tokens):
    p = jax.nn.log_softmax(lm(tokens), -1)
    q = jax.nn.log_softmax(qlm(tokens), -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


@pytest.mark.parametrize("fam", ["llama3", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_sequential_methods_on_each_architecture(lms, fam):
    """RTN and GPTQ run block by block on every family (AWQ and SmoothQuant on the two with
    special folds); on the calibration tokens GPTQ's KL from float beats RTN's at 3 bits, AWQ is
    no worse than RTN, and SmoothQuant W8A8 stays close to float."""
    lm = lms[fam]
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (8, 24)), jnp.int32)
    kls = {}
    recipes = {"rtn": Recipe("rtn", "int3-g16"), "gptq": Recipe("gptq", "int3-g16")}
    if fam in ("qwen2", "gemma2"):  # folds into biased projections and (1 + w) norms; every family's
        # folds are checked exactly by test_scale_folds_are_exact
        recipes |= {"awq": Recipe("awq", "int3-g16", awq_grid=10), "sq": Recipe("smoothquant", "int8")}
    for name, recipe in recipes.items():
        qlm, reports = jaxq.lm.quantize_lm(lm, recipe, calib_tokens=tokens, progress=False)
        assert len(reports) == lm.config.num_layers
        kernel = qlm.params["layers_0"]["attn"]["q_proj"]["kernel"]
        assert isinstance(kernel, jaxq.QArray)
        kls[name] = _kl(lm, qlm, tokens)
    assert kls["gptq"] < kls["rtn"], kls
    if "awq" in kls:
        assert kls["awq"] <= kls["rtn"] * 1.05, kls
        assert kls["sq"] < 0.2 * kls["rtn"], kls


def test_cli_quantize_eval_generate(lms, tmp_path, capsys):
    import json

    from jaxq.cli import main

    folder = make_checkpoint(tmp_path / "hf", "llama3", seed=1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(chr(97 + (i * 7) % 26) for i in range(400)))
    out = tmp_path / "q.jaxq"
    assert main(["lm", "quantize", str(folder), "--out", str(out), "--method", "gptq", "--weights", "int4",
                 "--group-size", "16", "--calib", str(text), "--calib-tokens", "256", "--seq-len", "32", "-q"]) == 0
    assert "bits per weight" in capsys.readouterr().out
    js = tmp_path / "m.json"
    assert main(["lm", "eval", str(out), "--reference", str(folder), "--text", str(text), "--window", "32",
                 "--json", str(js)]) == 0
    assert capsys.readouterr().out.startswith("ppl ")
    res = json.loads(js.read_text())
    assert {"ppl", "kl", "top1", "bytes", "bits_per_weight", "tokens"} <= set(res)
    assert res["kl"] > 0 and 0 < res["top1"] <= 1 and res["bits_per_weight"] < 32
    assert main(["lm", "generate", str(out), "--prompt", "a b", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("a b")
    # GGUF output needs a BPE tokenizer: refused before any calibration work.
    assert main(["lm", "quantize", str(folder), "--out", str(tmp_path / "w.gguf"), "--weights", "int4",
                 "--group-size", "32", "-q"]) == 2
    assert "GGUF carries BPE tokenizers" in capsys.readouterr().err
    assert not (tmp_path / "w.gguf").exists()
    # Errors end in one line, before any work.
    assert main(["lm", "quantize", str(folder), "--out", str(tmp_path / "no" / "q.jaxq")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["lm", "quantize", str(folder), "--out", str(tmp_path / "q.gguf"), "--weights", "int3"]) == 2
    assert "--format gguf writes" in capsys.readouterr().err


def test_cli_gguf_export_tinystories(tmp_path, capsys):
    """``--out x.gguf`` writes Q4_0 tensors that load back as the QArrays quantize_lm makes."""
    import os
    from pathlib import Path

    from jaxq.cli import main

    data = os.environ.get("JAXQ_DATA_DIR")
    if not data:
        pytest.skip("JAXQ_DATA_DIR is unset: needs tinystories_656k/")
    folder = Path(data) / "tinystories_656k"
    gg = tmp_path / "q.gguf"
    assert main(["lm", "quantize", str(folder), "--out", str(gg), "--method", "rtn", "--weights", "int4",
                 "--group-size", "32", "-q"]) == 0
    capsys.readouterr()
    back = jaxq.lm.load(gg)
    ref = jaxq.lm.load(folder)
    direct, _ = jaxq.lm.quantize_lm(ref, Recipe("rtn", jaxq.lm.weight_spec("int4", 32, target="gguf")), progress=False)
    # (q/k rows are written in llama.cpp's permuted order, so only the others compare directly)
    for path in (("attn", "v_proj"), ("attn", "o_proj"), ("mlp", "down_proj")):
        k_file = back.params["layers_1"][path[0]][path[1]]["kernel"]
        k_mem = direct.params["layers_1"][path[0]][path[1]]["kernel"]
        np.testing.assert_array_equal(np.asarray(k_file.dequantize()), np.asarray(k_mem.dequantize()))
    tokens = jnp.asarray([ref.encode("Once upon a time")])
    np.testing.assert_allclose(np.asarray(back(tokens)), np.asarray(direct(tokens)), rtol=1e-4, atol=1e-4)
    assert back.encode("Once upon a time") == ref.encode("Once upon a time")
