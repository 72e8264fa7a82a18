"""jaxq.auto_policy: the knapsack solver, the sensitivity estimators, budgets, groups, bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.algorithms import allocation, sensitivity
from jaxq.algorithms.auto_policy import allocate, policy_objective


# --- the solver --------------------------------------------------------------------------------
def _brute_force(costs, values, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[j] for c, j in zip(costs, combo))
        if cost > budget:
            continue
        val = sum(v[j] for v, j in zip(values, combo))
        if best is None or val < best - 1e-12:
            best = val
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_is_optimal_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    items = int(rng.integers(1, 6))
    costs = [sorted(rng.integers(1, 60, int(rng.integers(1, 5))).tolist()) for _ in range(items)]
    values = [rng.uniform(-0.2, 3.0, len(c)).tolist() for c in costs]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = int(rng.integers(lo, hi + 1))
    sol = allocation.solve_allocation(costs, values, budget)
    assert sol.exact
    assert sol.cost <= budget
    assert sol.cost == sum(c[j] for c, j in zip(costs, sol.choices))
    np.testing.assert_allclose(sol.value, _brute_force(costs, values, budget), rtol=0, atol=1e-9)


def test_solver_coarse_units_still_fit_the_budget():
    rng = np.random.default_rng(0)
    costs = [rng.integers(1000, 100000, 4).tolist() for _ in range(8)]
    values = [rng.uniform(0, 1, 4).tolist() for _ in range(8)]
    budget = sum(min(c) for c in costs) + 123457
    sol = allocation.solve_allocation(costs, values, budget, max_states=64)
    assert not sol.exact and sol.unit > 1
    assert sol.cost <= budget
    exact = _brute_force(costs, values, budget)
    assert sol.value >= exact - 1e-12


def test_solver_rejects_an_infeasible_budget():
    with pytest.raises(ValueError, match="cheapest choices cost 5 in total, above the budget of 4"):
        allocation.solve_allocation([[2, 3], [3]], [[1.0, 0.0], [0.0]], 4)


# --- a model with one fragile layer -----------------------------------------------------------
D = 64
FRAGILE = "layer_2/kernel"


def _model():
    """Five 64x64 layers with tanh between; layer 2's input has eight outlier channels (x40)."""
    rng = np.random.default_rng(0)
    params = {f"layer_{i}": {"kernel": jnp.asarray(rng.standard_normal((D, D)) / np.sqrt(D), jnp.float32),
                             "bias": jnp.zeros((D,), jnp.float32)} for i in range(5)}
    gain = np.ones((5, D), np.float32)
    gain[2, :8] = 40.0
    params["layer_2"]["kernel"] = params["layer_2"]["kernel"] / jnp.asarray(np.sqrt(gain[2]))[:, None]
    gain = jnp.asarray(gain)

    def logits(p, x):
        h = x
        for i in range(5):
            h = (h * gain[i]) @ p[f"layer_{i}"]["kernel"] + p[f"layer_{i}"]["bias"]
            h = jnp.tanh(h) if i < 4 else h
        return h

    batches = [jnp.asarray(rng.standard_normal((128, D)), jnp.float32) for _ in range(2)]
    return params, logits, batches


CANDIDATES = ("int8", "int4", "int3", "int2")  # per output channel: 8.5, 4.5, 3.5, 2.5 bits per weight at K=64


@pytest.fixture(scope="module")
def fragile():
    params, fn, batches = _model()
    tables = {est: jaxq.sensitivity_table(fn, params, batches, candidates=CANDIDATES, estimator=est)
              for est in ("measured", "estimated")}
    return params, fn, batches, tables


@pytest.mark.parametrize("estimator", ["measured", "estimated"])
def test_fragile_layer_gets_more_bits_and_beats_uniform(fragile, estimator):
    params, fn, batches, tables = fragile
    policy, report = jaxq.auto_policy(fn, params, batches, candidates=CANDIDATES, budget=jaxq.BitsPerWeight(4.5),
                                      table=tables[estimator])
    bits = {r.path: r.bits_per_weight for r in report.layers}
    assert bits[FRAGILE] == max(bits.values())
    assert bits[FRAGILE] > 4.5, report.table()
    uniform = policy_objective(fn, params, batches, jaxq.PRESETS["int4"])
    uniform_bytes = jaxq.tree_nbytes(jaxq.quantize(params, "int4")) - 5 * D * 4  # biases are not in the budget
    assert report.bytes <= uniform_bytes
    assert report.measured < 0.7 * uniform, (report.measured, uniform)


def test_estimated_and_measured_rank_alike(fragile):
    *_, tables = fragile
    rho = sensitivity.rank_correlation(tables["measured"].values, tables["estimated"].values)
    assert rho > 0.8, rho
    # int8 is a small perturbation: the second-order term should be close to the measured increase.
    c = [k.label for k in tables["measured"].candidates].index("int8")
    ratio = tables["estimated"].values[:, c] / tables["measured"].values[:, c]
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio


@pytest.mark.parametrize("bits", [2.5, 3.0, 4.5, 6.0, 8.5])
def test_budget_holds_exactly(fragile, bits):
    params, fn, batches, tables = fragile
    policy, report = allocate(tables["estimated"], jaxq.BitsPerWeight(bits))
    q = jaxq.quantize(params, policy)
    kernels = {k: v["kernel"] for k, v in q.items()}
    assert jaxq.tree_nbytes(kernels) == report.bytes
    assert report.bytes <= int(bits * 5 * D * D / 8)
    assert report.bits_per_weight <= bits
    # explicit exact-path rules, one per layer, first match wins
    assert [r.pattern for r in policy.rules] == [f"^layer_{i}/kernel$" for i in range(5)]


def test_bytes_budget_and_keep_float(fragile):
    params, fn, batches, _ = fragile
    limit = jaxq.tree_nbytes(jaxq.quantize({k: v["kernel"] for k, v in params.items()}, "int8")) + 2000
    policy, report = jaxq.auto_policy(fn, params, batches, candidates=("float", "int8", "int4"),
                                      budget=jaxq.Bytes(limit), verify=False)
    assert report.bytes <= limit and report.measured is None
    choices = {r.path: r.choice for r in report.layers}
    q = jaxq.quantize(params, policy)
    for path, choice in choices.items():
        leaf = q[path.split("/")[0]]["kernel"]
        assert jaxq.is_qarray(leaf) == (choice != "float")


def test_groups_share_one_choice_and_results_are_deterministic(fragile):
    params, fn, batches, _ = fragile
    groups = [["layer_1/kernel", "layer_2/kernel"], r"layer_[34]/kernel"]
    a = jaxq.auto_policy(fn, params, batches, candidates=CANDIDATES, budget=4.0, groups=groups, verify=False)
    b = jaxq.auto_policy(fn, params, batches, candidates=CANDIDATES, budget=4.0, groups=groups, verify=False)
    assert a[0] == b[0]
    assert len(a[1].layers) == 3  # layer_0, {1, 2}, {3, 4}
    specs = {r.pattern: r.weight for r in a[0].rules}
    assert specs["^layer_1/kernel$"] == specs["^layer_2/kernel$"]
    assert specs["^layer_3/kernel$"] == specs["^layer_4/kernel$"]


def test_group_sizes_are_fitted_per_layer():
    params = {"a": {"kernel": jnp.ones((576, 64))}, "b": {"kernel": jnp.ones((256, 64))}}
    table = jaxq.sensitivity_table(lambda p, x: x @ p["a"]["kernel"][:64] + x @ p["b"]["kernel"][:64], params,
                                   [jnp.ones((2, 64))], candidates=("int4-g128", "int8"), estimator="estimated")
    g = {item[0].path: table.specs[i][0][0].group_size for i, item in enumerate(table.items)}
    assert g == {"a/kernel": 96, "b/kernel": 128}


# --- the Fisher diagonal against numpy ---------------------------------------------------------
def test_fisher_diagonal_matches_numpy_logistic_regression():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    w = (rng.standard_normal((6, 3)) * 0.5).astype(np.float32)

    def loss(p, batch):
        xb, yb = batch
        logp = jax.nn.log_softmax(xb @ p["w"], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=-1))

    batches = [(jnp.asarray(x[:25]), jnp.asarray(y[:25])), (jnp.asarray(x[25:]), jnp.asarray(y[25:]))]
    got = sensitivity.fisher_diagonal(loss, {"w": jnp.asarray(w)}, batches, ["w"], "loss")["w"]
    z = x @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = x[:, :, None] * (p - np.eye(3)[y])[:, None, :]  # per-example gradient of -log p_y
    np.testing.assert_allclose(np.asarray(got), np.mean(g**2, axis=0), rtol=1e-4, atol=1e-7)


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input(fragile):
    params, fn, batches, tables = fragile
    with pytest.raises(ValueError, match="candidates is empty"):
        jaxq.auto_policy(fn, params, batches, candidates=(), budget=4.0)
    with pytest.raises(ValueError, match="below the smallest candidates"):
        allocate(tables["measured"], jaxq.BitsPerWeight(2.0))
    with pytest.raises(ValueError, match="above the largest candidates"):
        allocate(tables["measured"], jaxq.BitsPerWeight(9.0))
    with pytest.raises(ValueError, match="group 0 names 'layer_9/kernel'.*layer_0/kernel"):
        jaxq.auto_policy(fn, params, batches, candidates=CANDIDATES, budget=4.0, groups=[["layer_9/kernel"]])
    with pytest.raises(ValueError, match="layer_1/kernel is in groups 0 and 1"):
        jaxq.auto_policy(fn, params, batches, candidates=CANDIDATES, budget=4.0,
                         groups=[["layer_1/kernel"], [r"layer_1/.*"]])
    with pytest.raises(ValueError, match="unknown candidate 'int5-g7x'"):
        jaxq.auto_policy(fn, params, batches, candidates=("int5-g7x",), budget=4.0)
    with pytest.raises(ValueError, match="listed twice"):
        jaxq.auto_policy(fn, params, batches, candidates=("int8", "int8"), budget=4.0)
    with pytest.raises(ValueError, match="calib_batches is empty"):
        jaxq.auto_policy(fn, params, [], candidates=CANDIDATES, budget=4.0, estimator="measured")
    with pytest.raises(TypeError, match="BitsPerWeight"):
        jaxq.auto_policy(fn, params, batches, candidates=CANDIDATES, budget="4 bits")
    with pytest.raises(ValueError, match="objective='loss' needs fn"):
        jaxq.auto_policy(fn, params, batches, candidates=CANDIDATES, budget=4.0, objective="loss",
                         estimator="measured")
    with pytest.raises(ValueError, match="positive number of bits"):
        jaxq.BitsPerWeight(-1)


@pytest.mark.parametrize("estimator", ["measured", "estimated"])
def test_loss_objective_for_a_classifier(fragile, estimator):
    """``objective="loss"``: a scalar loss on (inputs, labels) batches; the fragile layer still wins bits."""
    params, fn, batches, _ = fragile
    labelled = [(x, jnp.argmax(fn(params, x), -1)) for x in batches]

    def loss(p, batch):
        x, y = batch
        logp = jax.nn.log_softmax(fn(p, x), -1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], -1))

    policy, report = jaxq.auto_policy(loss, params, labelled, candidates=CANDIDATES, budget=4.5, objective="loss",
                                      estimator=estimator)
    bits = {r.path: r.bits_per_weight for r in report.layers}
    assert bits[FRAGILE] == max(bits.values()) > 4.5, report.table()
    assert report.objective == "loss" and report.measured is not None
    assert report.measured < policy_objective(loss, params, labelled, jaxq.PRESETS["int4"], objective="loss")
