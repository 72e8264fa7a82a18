"""Auto-allocation on language models: per-kernel formats through the sequential driver and the CLI."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import jaxq.lm
from jaxq.algorithms.sequential import Recipe
from lm_reference import make_checkpoint


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return jaxq.lm.load(make_checkpoint(tmp_path_factory.mktemp("hf"), "llama3", seed=3))


def _tokens(n=4, t=24, seed=0):
    return np.random.default_rng(seed).integers(3, 97, (n, t)).astype(np.int32)


def _block_kernels(params):
    out = {}
    for k, v in params.items():
        if k.startswith("layers_"):
            for grp, mods in v.items():
                for name, leaves in mods.items():
                    if isinstance(leaves, dict) and "kernel" in leaves:
                        out[f"{k}/{grp}/{name}/kernel"] = leaves["kernel"]
    return out


CANDS = ("int8", "int4-g16", "int3-g16", "int2-g16")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_policy_drives_each_kernels_format_within_budget(lm, method):
    tokens = _tokens()
    policy, report = jaxq.lm.lm_auto_policy(lm, jaxq.BitsPerWeight(5.5), candidates=CANDS, calib_tokens=tokens,
                                            progress=False)
    assert len({r.choice for r in report.layers}) > 1, report.table()  # a real mix, not uniform
    qlm, _ = jaxq.lm.quantize_lm(lm, Recipe(method, policy=policy), calib_tokens=tokens, progress=False)
    kernels = _block_kernels(qlm.params)
    assert set(kernels) == {r.path for r in report.layers}
    n = sum(int(np.prod(k.shape)) for k in kernels.values())
    nbytes = jaxq.tree_nbytes(kernels)
    assert nbytes == report.bytes and 8 * nbytes / n <= 5.5
    for path, k in kernels.items():
        spec = policy.weight_spec(path, 2)
        assert isinstance(k, jaxq.QArray) and k.meta.fmt.name == spec.format
        assert k.meta.tiling.group_size == spec.group_size
    logits = qlm(jnp.asarray(tokens[:1]))
    assert np.isfinite(np.asarray(logits)).all()


def test_uniform_policy_equals_uniform_spec_for_gptq(lm):
    """A policy giving every kernel one format reproduces the single-spec recipe exactly (the
    per-format partition of an input group is then the whole group)."""
    tokens = _tokens()
    paths = [layer.path for layer in jaxq.algorithms.quantizable_layers(jaxq.dequantize(lm.params),
                                                                        jaxq.lm.auto.BLOCK_KERNELS)]
    policy = jaxq.Policy(tuple(jaxq.Rule(f"^{p}$", "int3-g16") for p in paths))
    a, _ = jaxq.lm.quantize_lm(lm, Recipe("gptq", policy=policy), calib_tokens=tokens, progress=False)
    b, _ = jaxq.lm.quantize_lm(lm, Recipe("gptq", "int3-g16"), calib_tokens=tokens, progress=False)
    for path, ka in _block_kernels(a.params).items():
        kb = _block_kernels(b.params)[path]
        np.testing.assert_array_equal(np.asarray(ka.dequantize()), np.asarray(kb.dequantize()), err_msg=path)


def test_mixed_formats_in_one_input_group(lm):
    """q/k/v share an input; different formats are quantized apart, a kernel left out stays float."""
    tokens = _tokens()
    policy = jaxq.Policy((jaxq.Rule(r"q_proj/kernel$", "int8"), jaxq.Rule(r"k_proj/kernel$", "int3-g16"),
                          jaxq.Rule(r"v_proj/kernel$", None), jaxq.Rule(r"kernel$", "int4-g16")))
    qlm, _ = jaxq.lm.quantize_lm(lm, Recipe("gptq", policy=policy), calib_tokens=tokens, progress=False)
    attn = qlm.params["layers_0"]["attn"]
    assert attn["q_proj"]["kernel"].meta.fmt.name == "int8"
    assert attn["k_proj"]["kernel"].meta.fmt.name == "int3"
    assert not isinstance(attn["v_proj"]["kernel"], jaxq.QArray)
    np.testing.assert_array_equal(np.asarray(attn["v_proj"]["kernel"]),
                                  np.asarray(lm.params["layers_0"]["attn"]["v_proj"]["kernel"]))
    assert qlm.params["layers_0"]["mlp"]["up_proj"]["kernel"].meta.fmt.name == "int4"


def test_recipe_policy_bad_input():
    with pytest.raises(ValueError, match="methods 'rtn', 'mse' and 'gptq', not 'awq'"):
        Recipe("awq", policy=jaxq.Policy((jaxq.Rule("kernel$", "int4"),)))
    with pytest.raises(TypeError, match="must be a jaxq.Policy"):
        Recipe("gptq", policy="int4")


def test_cli_budget_bits(lm, tmp_path, capsys):
    from jaxq.cli import main

    folder = make_checkpoint(tmp_path / "hf", "llama3", seed=3)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(chr(97 + (i * 7) % 26) for i in range(400)))
    out, rep = tmp_path / "q.jaxq", tmp_path / "auto.json"
    assert main(["lm", "quantize", str(folder), "--out", str(out), "--method", "rtn", "--budget-bits", "5.2",
                 "--candidates", ",".join(CANDS), "--calib", str(text), "--calib-tokens", "128", "--seq-len", "32",
                 "--report", str(rep), "-q"]) == 0
    assert "auto under 5.2 bits" in capsys.readouterr().out
    report = json.loads(rep.read_text())
    assert report["bits_per_weight"] <= 5.2 and report["layers"]
    back = jaxq.lm.load(out)
    kernels = _block_kernels(back.params)
    n = sum(int(np.prod(k.shape)) for k in kernels.values())
    assert 8 * jaxq.tree_nbytes(kernels) / n == pytest.approx(report["bits_per_weight"])
    for row in report["layers"]:
        assert kernels[row["path"]].meta.fmt.name == row["choice"].split("-")[0]
    # bad combinations fail in one line, before any work
    assert main(["lm", "quantize", str(folder), "--out", str(out), "--budget-bits", "4", "--weights", "int4"]) == 2
    assert "drop --weights" in capsys.readouterr().err
    assert main(["lm", "quantize", str(folder), "--out", str(out), "--budget-bits", "4", "--method", "awq"]) == 2
    assert "rtn, mse or gptq" in capsys.readouterr().err
    assert main(["lm", "quantize", str(folder), "--out", str(out), "--candidates", "int8"]) == 2
    assert "go with --budget-bits" in capsys.readouterr().err
    assert main(["lm", "quantize", str(folder), "--out", str(tmp_path / "q.gguf"), "--budget-bits", "4",
                 "--candidates", "int8,int4-g128"]) == 2
    assert "candidates among q8_0,q4_0,q4_1" in capsys.readouterr().err
    assert main(["lm", "quantize", str(folder), "--out", str(out), "--budget-bits", "1.0", "--method", "rtn",
                 "--candidates", ",".join(CANDS), "--calib", str(text), "--calib-tokens", "64", "--seq-len", "32",
                 "-q"]) == 2
    assert "below the smallest candidates" in capsys.readouterr().err


def test_gptq_aware_table_scales_by_gptq_error_ratios(lm):
    """GPTQ minimises the Hessian-weighted output error, so its error is below round-to-nearest's
    for the int formats (ratio < 1), and casts (bf16) keep their value (ratio 1)."""
    from jaxq.algorithms.gptq_sensitivity import gptq_error_ratios

    tokens = _tokens()
    cands = ("bf16", "int4-g16", "int3-g16")
    plain = jaxq.lm.lm_sensitivity(lm, candidates=cands, calib_tokens=tokens, progress=False)
    aware = jaxq.lm.lm_sensitivity(lm, candidates=cands, calib_tokens=tokens, progress=False, gptq_aware=True)
    assert aware.estimator == "estimated+gptq"
    params = jaxq.dequantize(lm.params)
    ratios = gptq_error_ratios(lm.module, params, jnp.asarray(tokens), plain)
    np.testing.assert_allclose(aware.values, plain.values * ratios, rtol=1e-6)
    assert np.all(ratios[:, 0] == 1.0)
    assert np.all(ratios[:, 1:] < 1.0), ratios
