"""``jaxq.auto_policy``: every layer's format chosen under a size budget.

Pure functions in three steps, each usable alone:

1. :func:`jaxq.algorithms.sensitivity.sensitivity_table`: exact bytes and sensitivity of every
   (layer or group, candidate format);
2. :func:`allocate`: the multiple-choice knapsack over that table for one budget
   (:func:`jaxq.algorithms.allocation.solve_allocation`), giving an explicit exact-path
   :class:`jaxq.Policy` and a :class:`AutoPolicyReport`; one table serves any number of budgets;
3. :func:`auto_policy`: both, plus the check that the additivity assumption holds (the chosen
   policy's measured objective next to the predicted sum of its layers' sensitivities).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jaxq.algorithms.allocation import Allocation, solve_allocation
from jaxq.algorithms.sensitivity import Evaluator, SensitivityTable, sensitivity_table
from jaxq.policy import Policy, Rule
from jaxq.quantize import dequantize, quantize
from jaxq.spec import QuantSpec

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BitsPerWeight:
    """Budget: average stored bits per quantizable weight, scales and zero points included."""

    bits: float

    def __post_init__(self):
        if not (isinstance(self.bits, (int, float)) and np.isfinite(self.bits) and self.bits > 0):
            raise ValueError(f"BitsPerWeight needs a positive number of bits, got {self.bits!r}")

    def limit_bytes(self, num_params: int) -> int:
        return int(np.floor(self.bits * num_params / 8 + 1e-9))


@dataclasses.dataclass(frozen=True)
class Bytes:
    """Budget: total stored bytes of the quantizable weights, scales and zero points included."""

    n: int

    def __post_init__(self):
        if not (isinstance(self.n, (int, np.integer)) and self.n > 0):
            raise ValueError(f"Bytes needs a positive integer byte count, got {self.n!r}")

    def limit_bytes(self, num_params: int) -> int:
        return int(self.n)


Budget = BitsPerWeight | Bytes


def as_budget(budget: Budget | float) -> Budget:
    """A :class:`BitsPerWeight` or :class:`Bytes`; a bare number means bits per weight."""
    if isinstance(budget, (BitsPerWeight, Bytes)):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return BitsPerWeight(float(budget))
    raise TypeError(f"budget must be jaxq.BitsPerWeight(bits) or jaxq.Bytes(n), got {type(budget).__name__}")


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """One row of the report."""

    path: str
    params: int
    choice: str
    bits_per_weight: float
    sensitivity: dict[str, float]


@dataclasses.dataclass(frozen=True)
class AutoPolicyReport:
    """What :func:`allocate` / :func:`auto_policy` chose and why.

    ``predicted`` is the sum of the chosen sensitivities (the objective's predicted increase);
    ``measured`` is the chosen policy's objective increase measured on the calibration batches
    (``None`` unless :func:`auto_policy` ran with ``verify=True``).
    """

    layers: tuple[LayerChoice, ...]
    objective: str
    estimator: str
    budget_bytes: int
    budget_bits: float
    bytes: int
    bits_per_weight: float
    num_params: int
    predicted: float
    measured: float | None
    exact: bool
    seconds: dict[str, float]

    def table(self) -> str:
        """A plain-text table: path, parameters, chosen format, bits, and every candidate's sensitivity."""
        cands = list(self.layers[0].sensitivity) if self.layers else []
        head = ["path", "params", "choice", "bits"] + cands
        rows = [head]
        for r in self.layers:
            rows.append([r.path, f"{r.params:,}", r.choice, f"{r.bits_per_weight:.3f}"]
                        + ["-" if not np.isfinite(r.sensitivity[c]) else f"{r.sensitivity[c]:.3g}" for c in cands])
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        meas = "not measured" if self.measured is None else f"{self.measured:.5g}"
        lines.append(f"{self.bits_per_weight:.3f} bits per weight ({self.bytes:,} of {self.budget_bytes:,} bytes "
                     f"allowed); predicted {self.objective} increase {self.predicted:.5g}, measured {meas}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (candidates that do not apply to a layer have sensitivity ``None``)."""

        def clean(x):
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            if isinstance(x, float) and not np.isfinite(x):
                return None
            return x

        return clean(dataclasses.asdict(self))


def _exact(path: str) -> str:
    return "^" + re.escape(path) + "$"


def allocate(table: SensitivityTable, budget: Budget | float) -> tuple[Policy, AutoPolicyReport]:
    """The least-sensitivity choice of one candidate per item whose total bytes fit ``budget``.

    Raises when the budget is below the smallest candidate (every layer at its cheapest format
    does not fit) or above the largest (every layer at its biggest format fits: allocation has
    nothing to decide).
    """
    budget = as_budget(budget)
    n = table.num_params
    limit = budget.limit_bytes(n)
    ok = table.costs >= 0
    low = int(np.where(ok, table.costs, np.iinfo(np.int64).max).min(axis=1).sum())
    high = int(np.where(ok, table.costs, -1).max(axis=1).sum())
    if limit < low:
        raise ValueError(f"budget of {limit:,} bytes ({8 * limit / n:.3f} bits per weight) is below the smallest "
                         f"candidates: every layer at its cheapest format takes {low:,} bytes ({8 * low / n:.3f} "
                         "bits per weight). Raise the budget or add a smaller candidate")
    if limit > high:
        raise ValueError(f"budget of {limit:,} bytes ({8 * limit / n:.3f} bits per weight) is above the largest "
                         f"candidates: every layer at its biggest format takes only {high:,} bytes "
                         f"({8 * high / n:.3f} bits per weight), so there is nothing to choose. Lower the budget, "
                         "add a larger candidate, or quantize uniformly")
    t0 = time.perf_counter()
    costs, values, index = [], [], []
    for i in range(len(table.items)):
        cs = [c for c in range(len(table.candidates)) if table.costs[i, c] >= 0]
        index.append(cs)
        costs.append([int(table.costs[i, c]) for c in cs])
        values.append([float(table.values[i, c]) for c in cs])
    sol: Allocation = solve_allocation(costs, values, limit)
    solve_s = time.perf_counter() - t0

    rules, rows = [], []
    for i, j in enumerate(sol.choices):
        c = index[i][j]
        cand = table.candidates[c]
        per = table.specs[i][c]
        sens = {k.label: float(table.values[i, ci]) for ci, k in enumerate(table.candidates)}
        for layer, spec in zip(table.items[i], per):
            rules.append(Rule(_exact(layer.path), weight=spec))
        size = sum(layer.size for layer in table.items[i])
        rows.append(LayerChoice(table.item_name(i), size, cand.label, 8 * int(table.costs[i, c]) / size, sens))
    policy = Policy(tuple(rules), name=f"auto-{8 * limit / n:.3g}bpw")
    report = AutoPolicyReport(
        layers=tuple(rows), objective=table.objective, estimator=table.estimator, budget_bytes=limit,
        budget_bits=8 * limit / n, bytes=sol.cost, bits_per_weight=8 * sol.cost / n, num_params=n,
        predicted=sol.value, measured=None, exact=sol.exact,
        seconds={"sensitivity": table.seconds, "solve": solve_s})
    return policy, report


def policy_objective(
    fn: Callable[[PyTree, Any], Any], params: PyTree, calib_batches: Iterable[Any], policy: Policy,
    objective: str = "kl",
) -> float:
    """The objective increase of ``params`` fake-quantized by ``policy`` over the float model's."""
    ev = Evaluator(fn, params, list(calib_batches), objective)
    return _policy_objective(ev, params, policy)


def _policy_objective(ev: Evaluator, params: PyTree, policy: Policy) -> float:
    return ev.increase(dequantize(quantize(params, policy)))


def auto_policy(
    loss_or_logits_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    calib_batches: Iterable[Any],
    *,
    candidates: Sequence[QuantSpec | str | None],
    budget: Budget | float,
    objective: str = "kl",
    groups: Sequence[str | Sequence[str]] | None = None,
    estimator: str = "estimated",
    include: str | None = None,
    verify: bool = True,
    table: SensitivityTable | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Policy, AutoPolicyReport]:
    """Chooses every quantizable layer's format to minimise the objective under ``budget``.

    Args:
      loss_or_logits_fn: ``fn(params, batch)``: logits ``[..., classes]`` for ``objective="kl"``
        (KL of the quantized model's outputs from the float model's), or a scalar loss for
        ``objective="loss"``.
      params: the float parameter tree.
      calib_batches: calibration batches (pytrees with a leading example axis).
      candidates: formats a layer may take: presets (``"bf16"``, ``"int8"``, ``"int4-g128"``),
        names like ``"int2-g32"``, :class:`QuantSpec` objects, and ``"float"`` to allow keeping a
        layer as it is. Group sizes that do not divide a layer's input axis are fitted to it.
      budget: :class:`BitsPerWeight` (average over the quantizable parameters, scales and zero
        points included) or :class:`Bytes` (their total); a number means bits per weight.
      objective: ``"kl"`` or ``"loss"``.
      groups: parameter paths (or ``re.fullmatch`` patterns) that must share one choice, e.g.
        ``[["layers_0/attn/q_proj/kernel", "layers_0/attn/k_proj/kernel"]]`` or ``[r"layers_0/.*"]``.
      estimator: ``"estimated"`` (second-order, from the Fisher: one backward pass per example) or
        ``"measured"`` (quantize each layer alone and evaluate: one forward pass per batch per
        layer and candidate). See :mod:`jaxq.algorithms.sensitivity`.
      include: pattern selecting the quantizable leaves (default: all float leaves of rank >= 2
        but biases and embedding tables).
      verify: measure the chosen policy's objective (one more pass over the batches).
      table: a precomputed :func:`sensitivity_table` (then the batches are only used to verify).
      seed: labels sampled for the Fisher (``estimator="estimated"``, ``objective="kl"``).
      progress: progress bar, or plain lines when stderr is not a terminal.

    Returns:
      ``(policy, report)``: ``policy`` has one exact-path rule per quantizable layer (a kept layer
      gets ``weight=None``) and goes to :func:`jaxq.quantize` like any other; ``report`` lists per
      layer its parameter count, chosen format, bits per weight and every candidate's sensitivity.
      The same inputs give the same policy.
    """
    batches = list(calib_batches)
    if table is None:
        table = sensitivity_table(loss_or_logits_fn, params, batches, candidates=candidates, objective=objective,
                                  estimator=estimator, groups=groups, include=include, seed=seed, progress=progress)
    policy, report = allocate(table, budget)
    if verify:
        t0 = time.perf_counter()
        measured = _policy_objective(Evaluator(loss_or_logits_fn, params, batches, table.objective), params, policy)
        report = dataclasses.replace(report, measured=measured,
                                     seconds={**report.seconds, "verify": time.perf_counter() - t0})
    return policy, report
