"""Calibration algorithms over a Dense kernel ``W [K, N]`` (``y = x @ W``) and input statistics.

Each is a pure function returning a :class:`jaxq.QArray` (plus auxiliary outputs in a NamedTuple)
and composes with any :class:`jaxq.QuantSpec` tiling a 2-D kernel per tensor, per output
channel, or per group of input rows (int8/int4/int3, nf4, fp8; symmetric or asymmetric):

* :mod:`~jaxq.algorithms.stats` - :class:`CalibStats` accumulated batch by batch
  (``X^T X``, ``E[x]``, ``E|x|``, ``max|x|``, count);
* :func:`gptq` - Hessian-based error compensation (act_order, lazy blocks, damping, groups);
  :func:`float_target` turns it into asymmetric calibration against the float model;
* :func:`awq` - activation-aware input scaling and clip search (returns the scale to fold);
  :func:`awq_scale` runs the scale search alone;
* :func:`smoothquant` - outlier migration for W8A8 (returns the activation divisor);
* :func:`bias_correction` - moves the mean output error into the bias (Dense and Conv);
* :func:`rtn`, :func:`mse_clip` - data-free baselines;
* :mod:`~jaxq.algorithms.sequential` - block-by-block calibration of whole transformers;
* :func:`auto_policy` - every layer's format chosen under a size budget, from a
  :func:`sensitivity_table` and the exact knapsack of :func:`solve_allocation`.
"""

from jaxq.algorithms.allocation import Allocation, solve_allocation
from jaxq.algorithms.auto_policy import AutoPolicyReport, BitsPerWeight, Bytes, LayerChoice, allocate, auto_policy, policy_objective
from jaxq.algorithms.awq import AWQResult, AWQScale, awq, awq_scale, awq_scales
from jaxq.algorithms.baseline import mse_clip, rtn
from jaxq.algorithms.bias_correction import bias_correction
from jaxq.algorithms.gptq import GPTQResult, float_target, gptq, inverse_cholesky
from jaxq.algorithms.sensitivity import SensitivityTable, as_candidates, fisher_diagonal, quantizable_layers, rank_correlation, sensitivity_table
from jaxq.algorithms.smoothquant import PER_TOKEN_INT8, SmoothQuantResult, smoothing_factors, smoothquant, w8a8_matmul
from jaxq.algorithms.stats import CalibStats, as_stats, compute_stats, init_stats, merge_stats, scale_stats, update_cross_moment, update_stats

__all__ = [
    "Allocation",
    "AutoPolicyReport",
    "BitsPerWeight",
    "Bytes",
    "LayerChoice",
    "SensitivityTable",
    "allocate",
    "as_candidates",
    "auto_policy",
    "fisher_diagonal",
    "policy_objective",
    "quantizable_layers",
    "rank_correlation",
    "sensitivity_table",
    "solve_allocation",
    "AWQResult",
    "AWQScale",
    "CalibStats",
    "GPTQResult",
    "PER_TOKEN_INT8",
    "SmoothQuantResult",
    "as_stats",
    "awq",
    "awq_scale",
    "awq_scales",
    "bias_correction",
    "compute_stats",
    "float_target",
    "gptq",
    "init_stats",
    "inverse_cholesky",
    "merge_stats",
    "mse_clip",
    "rtn",
    "scale_stats",
    "smoothing_factors",
    "smoothquant",
    "update_cross_moment",
    "update_stats",
    "w8a8_matmul",
]
