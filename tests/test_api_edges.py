"""API edges that used to be silently wrong or fail with bare errors (spec strings and arguments,
rule patterns, learned scales that match nothing, summarize on mixed trees, strict on quantized trees)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.spec import as_spec


@pytest.mark.parametrize("name", ["int4-g", "int4-gabc", "int4-g-32", "int4-g0", "int4-g12.5"])
def test_bad_group_suffix_is_refused(name):
    with pytest.raises(ValueError, match=r"group size after '-g' must be a positive integer, e.g. 'int4-g128'"):
        as_spec(name)


def test_group_size_types():
    assert jaxq.QuantSpec("int4", "per_group", np.int64(32)).group_size == 32
    assert type(jaxq.QuantSpec("int4", "per_group", np.int64(32)).group_size) is int
    with pytest.raises(ValueError, match="positive integer group_size, got True"):
        jaxq.QuantSpec("int4", "per_group", True)


def test_axes_must_be_integers():
    with pytest.raises(ValueError, match=r"channel_axes must be integer axes, got \[0.5\]"):
        jaxq.QuantSpec("int8", channel_axes=(0.5, -1))
    with pytest.raises(ValueError, match="group_axis must be an integer axis"):
        jaxq.QuantSpec("int4", "per_group", 32, group_axis=1.5)
    assert jaxq.QuantSpec("int8", channel_axes=(np.int64(0), -1)).channel_axes == (0, -1)


def test_rule_pattern_must_be_a_string():
    with pytest.raises(TypeError, match="rule pattern must be a regular expression string, got int 3"):
        jaxq.Rule(3, "int8")


def test_learned_scales_that_match_nothing_raise():
    params = {"Dense_0": {"kernel": jnp.ones((8, 4))}}
    scale = jnp.ones((1, 4))
    out = jaxq.quantize(params, "int8", scales={"Dense_0/kernel": scale})  # matching: used
    assert jaxq.is_qarray(out["Dense_0"]["kernel"])
    with pytest.raises(ValueError, match=r"match no leaf of this tree: \['Dense_1/kernel'\].*Dense_0/kernel"):
        jaxq.quantize(params, "int8", scales={"Dense_1/kernel": scale})


def test_summarize_handles_scalar_and_string_leaves():
    tree = {"w": jnp.ones((4, 4)), "step": 3, "name": "run-1", "q": jaxq.quantize_array(jnp.ones((4, 4)), jaxq.QuantSpec())}
    text = jaxq.summarize(tree)
    assert "step" in text and "int" in text and "name" in text and "str" in text and "int8" in text


def test_strict_on_an_already_quantized_tree_is_a_no_op():
    params = {"Dense_0": {"kernel": jnp.ones((8, 4))}}
    q = jaxq.quantize(params, "int8", strict=True)
    again = jaxq.quantize(q, "int8", strict=True)
    assert again["Dense_0"]["kernel"] is q["Dense_0"]["kernel"]
    with pytest.raises(ValueError, match="matched no leaf"):
        jaxq.quantize(q, jaxq.Rule("nothing_here", "int8"), strict=True)


def test_w8a8_long_contraction_does_not_wrap():
    """127 * 127 * K exceeds 2**31 - 1 from K = 133,145 on: the int32 accumulation is split, not wrapped."""
    from jaxq.ops.qmatmul import _INT32_SAFE_K, choose_impl, qmatmul

    k = 140_000
    x = jnp.full((1, k), 127.0, jnp.float32)  # per-token int8 scale 1: the codes are x itself
    w = jnp.full((k, 2), 127.0, jnp.float32).at[:, 1].set(-127.0)  # per-channel scale 1, codes +-127
    qw = jaxq.quantize_array(w, jaxq.QuantSpec("int8"), act_spec=jaxq.QuantSpec("int8", granularity="per_token"))
    got = np.asarray(qmatmul(x, qw), np.float64)
    ref = np.array([[127.0 * 127.0 * k, -127.0 * 127.0 * k]])
    assert 127 * 127 * k > 2**31 - 1
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert choose_impl(1, k, 2, qw.meta, qw.meta.act_spec, None) == "xla"
    with pytest.raises(ValueError, match="overflows for K = 140000"):
        choose_impl(1, k, 2, qw.meta, qw.meta.act_spec, "pallas")
    assert k > _INT32_SAFE_K


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ".."])
def test_recipe_names_cannot_leave_the_output_folder(name):
    from jaxq.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="names become file names"):
        parse_recipe({"name": name})
    with pytest.raises(RecipeError, match="names become file names"):
        parse_recipe({"strategies": [{"name": name, "precision": "int8"}]})


def test_version_flag(capsys):
    from jaxq.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxq {jaxq.__version__}"
