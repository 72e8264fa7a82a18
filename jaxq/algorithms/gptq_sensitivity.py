"""GPTQ-aware sensitivities for block models: how much GPTQ shrinks each kernel's error, per format.

A sensitivity table (:mod:`jaxq.algorithms.sensitivity`) scores round-to-nearest quantization.
GPTQ reduces the output error by different factors for different kernels and formats (far more at
3 bits than at 8), so a budget allocated on round-to-nearest scores is not the best one for a
model that GPTQ will quantize. :func:`gptq_error_ratios` measures, for every (kernel, candidate),
the ratio of GPTQ's layer output error to round-to-nearest's, both ``tr(dW^T H dW)`` with ``H``
the second moment of the kernel's input in the float model (block by block, as the sequential
driver collects it); :func:`gptq_aware` multiplies the table's values by those ratios.

Cost: one GPTQ solve per kernel and candidate, on the Hessians of one float pass over the
calibration tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.algorithms import protocol as P
from jaxq.algorithms.baseline import rtn
from jaxq.algorithms.gptq import gptq
from jaxq.algorithms.sensitivity import SensitivityTable
from jaxq.algorithms.sequential import Recipe, _get, _runner
from jaxq.progress import Progress
from jaxq.quantize import dequantize


@jax.jit
def _output_error(h: jax.Array, dw: jax.Array) -> jax.Array:
    return jnp.sum(dw * (h @ dw))


def gptq_error_ratios(
    model: Any,
    params: Any,
    tokens: jax.Array,
    table: SensitivityTable,
    *,
    recipe: Recipe | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> np.ndarray:
    """``float64 [items, candidates]``: GPTQ's output error over round-to-nearest's (1 where n/a).

    ``model`` follows the block protocol (:mod:`jaxq.algorithms.protocol`) and the table's layer
    paths are ``layers_{i}/<dense path>/kernel``, as for :func:`jaxq.lm.lm_sensitivity`. GPTQ runs
    with ``recipe``'s options (default :class:`Recipe` ``("gptq")``: act-order, MSE ranges).
    """
    recipe = Recipe("gptq") if recipe is None else recipe
    where: dict[str, tuple[int, int]] = {}
    for i, item in enumerate(table.items):
        for j, layer in enumerate(item):
            where[layer.path] = (i, j)
    e_rtn = np.zeros(table.values.shape)
    e_gptq = np.zeros(table.values.shape)
    h = P.embed(model, params, tokens)
    runner = _runner(model, None, batch_size)
    n = model.num_blocks()
    bar = Progress(n, "GPTQ error ratios", progress)
    try:
        for b in range(n):
            bp = dequantize(P.block_params(params, b), jnp.float32)
            runner.at(b)
            layout = P.block_layout(model, b, runner.dense_paths(bp, h))
            stats = runner.collect(bp, h, layout, hessian=True)
            for g in layout:
                st = stats[g.name]
                hess = st.xtx / jnp.maximum(st.count, 1.0)
                for p in g.denses:
                    path = f"layers_{b}/{'/'.join(p)}/kernel"
                    if path not in where:
                        continue
                    i, j = where[path]
                    w = _get(bp, p)["kernel"].astype(jnp.float32)
                    for c, cand in enumerate(table.candidates):
                        per = table.specs[i][c]
                        if per is None or cand.spec is None:
                            continue
                        spec = per[j]
                        if not spec.fmt.has_scale:  # casts (bf16): nothing for GPTQ to compensate
                            continue
                        q_r = rtn(w, spec, name=path).dequantize(jnp.float32)
                        gspec = spec.replace(range_method="mse") if recipe.gptq_mse else spec
                        q_g = gptq([w], st, gspec, block_size=recipe.block_size, percdamp=recipe.percdamp,
                                   act_order=recipe.act_order, name=path).q[0].dequantize(jnp.float32)
                        e_rtn[i, c] += float(_output_error(hess, q_r - w))
                        e_gptq[i, c] += float(_output_error(hess, q_g - w))
            h = runner.forward(bp, h)
            bar.step(b)
    finally:
        bar.close()
    return np.where(e_rtn > 0, e_gptq / np.where(e_rtn > 0, e_rtn, 1.0), 1.0)


def gptq_aware(table: SensitivityTable, ratios: np.ndarray, seconds: float = 0.0) -> SensitivityTable:
    """The table with every value scaled by its GPTQ error ratio (estimator ``"<name>+gptq"``)."""
    if ratios.shape != table.values.shape:
        raise ValueError(f"ratios of shape {ratios.shape} do not match the table's {table.values.shape}")
    return table.replace(values=table.values * ratios, estimator=f"{table.estimator}+gptq",
                         seconds=table.seconds + seconds)
