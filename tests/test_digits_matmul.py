"""The CPU int8-digit path of weight-only int8 matmuls against a float64 numpy reference."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.ops.qmatmul import qmatmul

Q = importlib.import_module("jaxq.ops.qmatmul")


def _reference(x: np.ndarray, w: jaxq.QArray) -> np.ndarray:
    return x.astype(np.float64) @ np.asarray(w.dequantize(), np.float64)


@pytest.mark.parametrize("spec", [jaxq.QuantSpec("int8"), jaxq.QuantSpec("int8", "per_group", 32)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_digits_match_float64_reference(spec, m):
    """Three int8 digits carry float32's precision: relative error <= 1e-5 of max |y|."""
    rng = np.random.default_rng(m)
    w = jaxq.quantize_array(jnp.asarray(rng.normal(size=(256, 48)), jnp.float32), spec)
    x = rng.normal(size=(m, 256)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1)).astype(np.float32)
    x[0, 7] = 0.0
    assert Q._digits_matmul_ok(jnp.asarray(x), w)
    got = np.asarray(jax.jit(qmatmul)(jnp.asarray(x), w), np.float64)
    ref = _reference(x, w)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    # Digits really are int8 codes whose scaled sum is x.
    q, s = Q._int_digits(jnp.asarray(x))
    assert q.dtype == jnp.int8
    np.testing.assert_allclose(np.sum(np.asarray(q, np.float64) * np.asarray(s), 0), x, rtol=0, atol=1e-6 * np.abs(x).max())


def test_digits_path_propagates_non_finite():
    w = jaxq.quantize_array(jnp.ones((64, 8)), jaxq.QuantSpec("int8"))
    x = jnp.ones((2, 64)).at[0, 3].set(jnp.nan).at[1, 5].set(jnp.inf)
    y = np.asarray(jax.jit(qmatmul)(x, w))
    assert np.isnan(y[0]).all() and not np.isfinite(y[1]).any()


def test_digits_path_declines_what_it_cannot_do_exactly():
    x = jnp.ones((2, 64))
    for q, why in [(jaxq.quantize_array(jnp.ones((64, 8)), jaxq.QuantSpec("int8", symmetric=False)), "zero point"),
                   (jaxq.quantize_array(jnp.ones((64, 8)), jaxq.QuantSpec("int4")), "packed codes"),
                   (jaxq.quantize_array(jnp.ones((64, 8)), jaxq.QuantSpec("fp8")), "not int")]:
        assert not Q._digits_matmul_ok(x, q), why
    big = jaxq.quantize_array(jnp.ones((64, 8)), jaxq.QuantSpec("int8"))
    assert not Q._digits_matmul_ok(jnp.ones((17, 64)), big)  # many rows: one dequantization is cheaper
