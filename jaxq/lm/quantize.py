"""Quantize a language model block by block with RTN, MSE clip, GPTQ, AWQ or SmoothQuant.

:func:`quantize_lm` tokenizes the calibration text, embeds it, and runs the sequential driver
(:func:`jaxq.algorithms.sequential.quantize_blocks`) over the decoder's blocks, one at a time,
with a progress bar (plain lines when stderr is not a terminal). Only one block's float and
quantized parameters and the calibration activations are live at once, so the whole float model
is never needed: a checkpoint loaded with native quantized tensors (a GGUF file) is dequantized
block by block. The token embedding and the output head keep the form they were loaded in.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxq.algorithms import protocol as P
from jaxq.algorithms.sequential import METHODS, BlockReport, Recipe, quantize_blocks
from jaxq.lm.evaluate import token_windows
from jaxq.lm.model import LM
from jaxq.quantize import dequantize
from jaxq.progress import Progress
from jaxq.spec import QuantSpec

GGUF_LAYOUTS = {
    # weights, symmetric -> the QuantSpec that writes as that GGUF type
    ("int8", True): ("Q8_0", dict(format="int8", granularity="per_group", group_size=32, scale_dtype="float16")),
    ("int4", True): ("Q4_0", dict(format="int4", granularity="per_group", group_size=32, scale_dtype="float16",
                                  full_range=True)),
    ("int4", False): ("Q4_1", dict(format="int4", granularity="per_group", group_size=32, symmetric=False,
                                   scale_dtype="float16", zero_point_domain="value")),
}


def default_calibration_text() -> str:
    """The small embedded calibration sample (a few kinds of English prose, a dialogue, code)."""
    return resources.files("jaxq.lm").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def weight_spec(weights: str = "int4", group_size: int | None = 128, *, symmetric: bool = True,
                target: str = "jaxq") -> QuantSpec:
    """The weight spec for ``jaxq lm quantize`` options.

    ``target="gguf"`` picks the layout that exports exactly (int8 -> Q8_0, int4 -> Q4_0, asymmetric
    int4 -> Q4_1, all in groups of 32 with float16 scales); other settings raise with the list.
    """
    if target == "gguf":
        key = (weights, bool(symmetric))
        if key not in GGUF_LAYOUTS or group_size not in (None, 32):
            fits = ", ".join(f"{w} {'symmetric' if s else 'asymmetric'} -> {t}" for (w, s), (t, _) in GGUF_LAYOUTS.items())
            raise ValueError(f"--format gguf writes {fits}, in groups of 32; got {weights} "
                             f"{'symmetric' if symmetric else 'asymmetric'} with group size {group_size}")
        return QuantSpec(**GGUF_LAYOUTS[key][1])
    if target != "jaxq":
        raise ValueError(f"unknown output format {target!r}; choose 'jaxq' or 'gguf'")
    if group_size:
        return QuantSpec(weights, "per_group", int(group_size), symmetric=symmetric)
    return QuantSpec(weights, "per_channel", symmetric=symmetric)


def calibration_tokens(lm: LM, text: str | None = None, *, num_tokens: int = 8192, seq_len: int = 256) -> np.ndarray:
    """``[N, seq_len]`` calibration windows from ``text`` (default: the embedded sample).

    When the text is shorter than ``num_tokens`` every window it has is used (the default sample
    gives about 900 tokens); the result always has at least one window.
    """
    text = default_calibration_text() if text is None else text
    bos = lm.config.bos_token_id if lm.config.add_bos else None
    ids = lm.encode(text, add_bos=False)
    seq_len = min(seq_len, len(ids) + (bos is not None))
    return token_windows(ids, seq_len, bos, max(1, num_tokens // seq_len))


def quantize_lm(
    lm: LM,
    recipe: Recipe | None = None,
    *,
    calib_tokens: np.ndarray | None = None,
    batch_size: int = 4,
    progress: bool = True,
    on_block: Callable[[int, Any], Any] | None = None,
) -> tuple[LM, list[BlockReport]]:
    """Quantizes every decoder block of ``lm`` with ``recipe`` (default: GPTQ int4 g128).

    Args:
      lm: the model (its QArray leaves, e.g. from a GGUF file, are dequantized block by block).
      recipe: :class:`jaxq.algorithms.sequential.Recipe` (method, weight spec, activation spec...).
      calib_tokens: ``[N, T]`` calibration windows (default: :func:`calibration_tokens`).
      batch_size: sequences per micro-batch of the calibration forwards.
      progress: progress bar / lines on stderr.

    Returns:
      The quantized LM and the per-block reports (seconds, GPTQ/AWQ losses).
    """
    recipe = Recipe() if recipe is None else recipe
    if recipe.method not in METHODS:
        raise ValueError(f"unknown method {recipe.method!r}; choose one of {METHODS}")
    tokens = calibration_tokens(lm) if calib_tokens is None else np.asarray(calib_tokens, np.int32)
    module = lm.module
    params = dict(lm.params)
    h = P.embed(module, params, jnp.asarray(tokens))
    n = lm.config.num_layers
    bar = Progress(n, f"{recipe.method} {'per-kernel policy' if recipe.policy else recipe.spec.format}", progress)

    def block(i: int) -> Any:
        return dequantize(P.block_params(params, i), jnp.float32)

    def done(i: int, qbp: Any) -> Any:
        bar.step(i)
        return qbp if on_block is None else on_block(i, qbp)

    try:
        qblocks, _, reports = quantize_blocks(module, h, block, recipe, num_blocks=n, batch_size=batch_size,
                                              on_block=done, propagate=recipe.needs_stats)
    finally:
        bar.close()
    for i, qb in enumerate(qblocks):
        params[f"layers_{i}"] = qb
    return lm.replace(params=params), reports
