"""Bad input gets a clear error naming the parameter path, the shape, and what would work."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import QuantSpec, Rule


def tree(w):
    return {"params": {"Dense_0": {"kernel": w}}}


def test_nan_in_weight_names_path_and_shape():
    w = np.ones((8, 4), np.float32)
    w[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*\(8, 4\).*1 NaN"):
        jaxq.quantize(tree(w))


def test_inf_in_weight():
    w = np.ones((8, 4), np.float32)
    w[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*non-finite.*0 NaN, 1 Inf"):
        jaxq.quantize(tree(w))


def test_group_size_not_dividing_axis():
    with pytest.raises(ValueError, match=r"group size 128 does not divide axis -2 of length 100 for params/Dense_0/kernel with shape \(100, 8\); use a divisor of 100 such as \[10, 20, 25, 50, 100\]"):
        jaxq.quantize(tree(jnp.ones((100, 8))), "int4-g128")


def test_unknown_format():
    with pytest.raises(ValueError, match=r"unknown format 'int5'.*int4"):
        Rule(".*kernel", "int5")
    with pytest.raises(ValueError, match=r"unknown policy preset 'int5'"):
        jaxq.quantize(tree(jnp.ones((8, 4))), "int5")


def test_axis_out_of_range():
    rule = Rule("kernel", QuantSpec("int8", channel_axes=(3,)))
    with pytest.raises(ValueError, match=r"channel axis 3 is out of range for params/Dense_0/kernel with shape \(8, 4\)"):
        jaxq.quantize(tree(jnp.ones((8, 4))), rule)


def test_non_float_leaf_matched_by_rule():
    with pytest.raises(TypeError, match=r"params/Dense_0/kernel.*int32 leaf of shape \(8, 4\).*only floating-point"):
        jaxq.quantize(tree(jnp.ones((8, 4), jnp.int32)), Rule("kernel", "int8"))
    # Presets skip integer leaves silently (step counters, token tables).
    out = jaxq.quantize(tree(jnp.ones((8, 4), jnp.int32)), "int8")
    assert out["params"]["Dense_0"]["kernel"].dtype == jnp.int32


def test_already_quantized_tree_is_returned_unchanged():
    q = jaxq.quantize(tree(jnp.ones((8, 4))), "int4")
    again = jaxq.quantize(q, "int8")
    assert again["params"]["Dense_0"]["kernel"] is q["params"]["Dense_0"]["kernel"]


def test_strict_reports_rules_that_matched_nothing():
    policy = jaxq.Policy((Rule("Dense_0/kernel", "int8"), Rule("Dnese_1/kernel", "int4")))
    with pytest.raises(ValueError, match=r"strict=True.*Dnese_1/kernel"):
        jaxq.quantize(tree(jnp.ones((8, 4))), policy, strict=True)
    jaxq.quantize(tree(jnp.ones((8, 4))), policy)  # not strict: fine


def test_bad_spec_values():
    with pytest.raises(ValueError, match="per_group needs a positive integer group_size"):
        QuantSpec("int4", "per_group")
    with pytest.raises(ValueError, match="symmetric only"):
        QuantSpec("nf4", symmetric=False)
    with pytest.raises(ValueError, match="unknown range_method"):
        QuantSpec("int8", range_method="kl")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Rule("(", "int8")


def test_learned_scale_of_wrong_shape():
    with pytest.raises(ValueError, match=r"scale for params/Dense_0/kernel of shape \(8, 4\) has shape \(1, 3\).*needs \(1, 4\)"):
        jaxq.quantize(tree(jnp.ones((8, 4))), Rule("kernel", "int8"), scales={"params/Dense_0/kernel": jnp.ones((1, 3))})


def test_qmatmul_shape_mismatch():
    q = jaxq.quantize(tree(jnp.ones((8, 4))))["params"]["Dense_0"]["kernel"]
    with pytest.raises(ValueError, match=r"x has 5 features but the weight has shape \(8, 4\)"):
        jaxq.ops.qmatmul(jnp.ones((2, 5)), q)
