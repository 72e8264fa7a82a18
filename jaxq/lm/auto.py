"""Every decoder kernel's format chosen under a size budget (:func:`jaxq.auto_policy` on an LM).

The quantizable layers are the Dense kernels of the decoder blocks (``layers_i/.../kernel``), the
ones the sequential driver quantizes; the token embedding and output head keep the form they were
loaded in and are outside the budget. The objective is the mean KL of the next-token
distributions from the float model's on the calibration windows. The chosen policy then drives
:func:`jaxq.lm.quantize_lm` (RTN, MSE clip or GPTQ), each kernel in its own format.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jaxq.algorithms.auto_policy import AutoPolicyReport, Budget, auto_policy
from jaxq.algorithms.gptq_sensitivity import gptq_aware as with_gptq_ratios
from jaxq.algorithms.gptq_sensitivity import gptq_error_ratios
from jaxq.algorithms.sensitivity import SensitivityTable, sensitivity_table
from jaxq.lm.model import LM
from jaxq.lm.quantize import calibration_tokens
from jaxq.policy import Policy
from jaxq.quantize import dequantize
from jaxq.spec import QuantSpec

DEFAULT_CANDIDATES = ("bf16", "int8", "int4-g32", "int4-g128", "int3-g64", "int2-g32")
BLOCK_KERNELS = r"^layers_\d+/.*kernel$"


class Calibration(NamedTuple):
    """The objective's pieces for one LM: its logits function, float params, batches and tokens."""

    fn: Callable[[Any, Any], Any]
    params: Any
    batches: list[Any]
    tokens: np.ndarray


def calibration(lm: LM, calib_tokens: np.ndarray | None = None, batch_size: int = 4) -> Calibration:
    """``lm``'s float params (dequantized once), its logits function and ``[batch_size, T]`` batches."""
    tokens = calibration_tokens(lm) if calib_tokens is None else np.asarray(calib_tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"calib_tokens must be int32 [N, T] windows with N >= 1, got shape {tokens.shape}")
    batches = [jnp.asarray(tokens[i : i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]
    module = lm.module
    params = dequantize(lm.params, jnp.float32)

    def logits(p: Any, toks: Any) -> Any:
        return module.apply({"params": p}, toks)

    return Calibration(logits, params, batches, tokens)


def _table(lm: LM, cal: Calibration, candidates, estimator, groups, batch_size, progress, seed,
           gptq_aware) -> SensitivityTable:
    table = sensitivity_table(cal.fn, cal.params, cal.batches, candidates=candidates, objective="kl",
                              estimator=estimator, groups=groups, include=BLOCK_KERNELS, seed=seed, progress=progress)
    if gptq_aware:
        t0 = time.perf_counter()
        ratios = gptq_error_ratios(lm.module, cal.params, jnp.asarray(cal.tokens), table, batch_size=batch_size,
                                   progress=progress)
        table = with_gptq_ratios(table, ratios, time.perf_counter() - t0)
    return table


def lm_sensitivity(
    lm: LM,
    *,
    candidates: Sequence[QuantSpec | str | None] = DEFAULT_CANDIDATES,
    calib_tokens: np.ndarray | None = None,
    estimator: str = "estimated",
    groups: Sequence[str | Sequence[str]] | None = None,
    batch_size: int = 4,
    progress: bool = True,
    seed: int = 0,
    gptq_aware: bool = False,
) -> SensitivityTable:
    """The sensitivity table of ``lm``'s block kernels (see :func:`jaxq.sensitivity_table`).

    ``gptq_aware=True`` scales every value by how much GPTQ shrinks that kernel's output error in
    that format (:mod:`jaxq.algorithms.gptq_sensitivity`): the table to allocate with when GPTQ
    will quantize the model. It costs one GPTQ solve per kernel and candidate.
    """
    return _table(lm, calibration(lm, calib_tokens, batch_size), candidates, estimator, groups, batch_size, progress,
                  seed, gptq_aware)


def lm_auto_policy(
    lm: LM,
    budget: Budget | float,
    *,
    candidates: Sequence[QuantSpec | str | None] = DEFAULT_CANDIDATES,
    calib_tokens: np.ndarray | None = None,
    estimator: str = "estimated",
    groups: Sequence[str | Sequence[str]] | None = None,
    table: SensitivityTable | None = None,
    verify: bool = False,
    batch_size: int = 4,
    progress: bool = True,
    seed: int = 0,
    gptq_aware: bool = False,
) -> tuple[Policy, AutoPolicyReport]:
    """The per-kernel policy for ``lm`` under ``budget`` (bits per weight over the block kernels).

    ``verify=True`` also measures the chosen (round-to-nearest) policy's KL on the calibration
    windows. Pass ``table`` (from :func:`lm_sensitivity`) to solve several budgets from one pass;
    ``gptq_aware`` as in :func:`lm_sensitivity` (for a model GPTQ will quantize).
    """
    cal = calibration(lm, calib_tokens, batch_size)
    if table is None:
        table = _table(lm, cal, candidates, estimator, groups, batch_size, progress, seed, gptq_aware)
    return auto_policy(cal.fn, cal.params, cal.batches, candidates=candidates, budget=budget, objective="kl", groups=groups,
                       estimator=estimator, include=BLOCK_KERNELS, verify=verify, table=table, seed=seed,
                       progress=progress)
