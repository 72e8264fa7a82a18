"""The multiple-choice knapsack behind :func:`jaxq.auto_policy`: one choice per item, total cost
within a budget, least summed value.

Items are layers (or groups of layers that share a format), choices their candidate formats,
costs their exact storage bytes and values their sensitivities. :func:`solve_allocation` is a
dynamic programme over the cost *above each item's cheapest choice*, in units of the greatest
common divisor of those extra costs and the slack: exact whenever that gives at most
``max_states`` states. Otherwise the unit grows and every extra cost is rounded *up* to it, so
the answer still fits the budget exactly (it may then miss the optimum by less than one unit per
item, which :attr:`Allocation.exact` reports).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

MAX_STATES = 1 << 18


class Allocation(NamedTuple):
    """A solution: ``choices[i]`` indexes item ``i``'s choices."""

    choices: tuple[int, ...]
    cost: int
    value: float
    exact: bool
    unit: int


def _check(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(values):
        raise ValueError(f"{len(costs)} items have costs but {len(values)} have values")
    if not costs:
        raise ValueError("nothing to allocate: no items")
    for i, (c, v) in enumerate(zip(costs, values)):
        if len(c) == 0:
            raise ValueError(f"item {i} has no choices")
        if len(c) != len(v):
            raise ValueError(f"item {i} has {len(c)} costs but {len(v)} values")
        if any(int(x) != x or x < 0 for x in c):
            raise ValueError(f"item {i}: costs must be non-negative integers, got {list(c)}")
        if not all(math.isfinite(float(x)) for x in v):
            raise ValueError(f"item {i}: values must be finite, got {list(v)}")


def solve_allocation(
    costs: Sequence[Sequence[int]],
    values: Sequence[Sequence[float]],
    budget: int,
    *,
    max_states: int = MAX_STATES,
) -> Allocation:
    """Least ``sum(values[i][choice_i])`` subject to ``sum(costs[i][choice_i]) <= budget``.

    Ties go to the earlier choice of each item, so the result is deterministic. Raises when
    even the cheapest choice of every item exceeds ``budget``.
    """
    _check(costs, values)
    c = [np.asarray(ci, np.int64) for ci in costs]
    v = [np.asarray(vi, np.float64) for vi in values]
    base = int(sum(int(ci.min()) for ci in c))
    budget = int(budget)
    if base > budget:
        raise ValueError(f"the cheapest choices cost {base} in total, above the budget of {budget}")
    slack = budget - base
    extra = [ci - ci.min() for ci in c]
    unit = 0
    for e in extra:
        for x in e:
            unit = math.gcd(unit, int(x))
    unit = math.gcd(unit, slack) if unit else 1
    unit = max(unit, 1)
    exact = True
    if slack // unit > max_states:
        unit = -(-slack // max_states)
        exact = False
    states = slack // unit
    steps = [-(-e // unit) for e in extra]  # rounded up: a solution in units always fits in bytes

    # dp[s]: least value of the items so far with at most s units of extra cost.
    dp = np.zeros(states + 1)
    picks = np.empty((len(c), states + 1), np.int16 if max(len(ci) for ci in c) < 2**15 else np.int32)
    for i, (st, vi) in enumerate(zip(steps, v)):
        new = np.full(states + 1, np.inf)
        pick = picks[i]
        pick.fill(-1)
        for j, (w, val) in enumerate(zip(st.tolist(), vi.tolist())):
            if w > states:
                continue
            cand = np.full(states + 1, np.inf)
            cand[w:] = dp[: states + 1 - w] + val
            better = cand < new  # strict: ties keep the earlier choice
            new = np.where(better, cand, new)
            pick[better] = j
        dp = new
    choices = []
    s = states
    for i in range(len(c) - 1, -1, -1):
        j = int(picks[i, s])
        choices.append(j)
        s -= int(steps[i][j])
    choices.reverse()
    cost = int(sum(int(ci[j]) for ci, j in zip(c, choices)))
    value = float(sum(float(vi[j]) for vi, j in zip(v, choices)))
    assert cost <= budget, (cost, budget)
    return Allocation(tuple(choices), cost, value, exact, unit)
