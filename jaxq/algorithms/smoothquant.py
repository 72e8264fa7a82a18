r"""SmoothQuant: migrate activation outliers into the weights for W8A8 (Xiao et al., 2022, arXiv:2211.10438).

Activation outliers sit in a few fixed input channels, which makes per-token int8 activation
quantization lossy. A per-input-channel divisor moves that difficulty into the weights, which
are easy to quantize per output channel:

.. math::  y = x W = (x\,\mathrm{diag}(s)^{-1})(\mathrm{diag}(s)\,W), \qquad
           s_j = \frac{\max|x_j|^{\alpha}}{\max_n |W_{jn}|^{1-\alpha}}

with migration strength ``alpha`` (0.5 by default; larger moves more into the weights).
Channels that were never active (``max|x_j| = 0``) or have an all-zero weight row keep
``s_j = 1``; the rest is clamped to ``>= 1e-5`` as in the reference code.

**Contract.** ``q`` quantizes the *smoothed* weight ``diag(s) W``; the layer's input must be
divided by ``act_divisor = s`` before the (per-token, dynamic int8) activation quantization:
``y = Q_tok(x / s) @ q``. Fold ``1/s`` into the previous op (a norm's scale, or the output
columns of a preceding linear map) so that it costs nothing at run time. Kernels that read the
same input (q/k/v, gate/up) must be smoothed together: pass them as a sequence.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.algorithms import _common as C
from jaxq.algorithms.stats import CalibStats, as_stats
from jaxq.qarray import QArray, quantize_array
from jaxq.spec import QuantSpec, as_spec

PER_TOKEN_INT8 = QuantSpec(format="int8", granularity="per_token")
"""Dynamic per-token int8 activations (one scale per row), the W8A8 activation spec."""


class SmoothQuantResult(NamedTuple):
    """``q``: quantized smoothed kernel(s); ``weight``: the smoothed float kernel(s) ``diag(s) W``;
    ``act_divisor``: ``s [K]`` (divide the layer input by it)."""

    q: QArray | tuple[QArray, ...]
    weight: jax.Array | tuple[jax.Array, ...]
    act_divisor: jax.Array


def smoothing_factors(
    act_absmax: jax.Array, w_absmax: jax.Array, alpha: float = 0.5, tie: jax.Array | None = None, slots: int = 0
) -> jax.Array:
    """``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``; 1 for dead channels or zero weight rows.

    With a ``tie`` map (channel -> slot) both maxima are taken over each slot's channels, which
    then share one factor; the result is still per channel ``[K]``.
    """
    a = C.tie_reduce(act_absmax.astype(jnp.float32), tie, slots, "max")
    b = C.tie_reduce(w_absmax.astype(jnp.float32), tie, slots, "max")
    live = (a > 0) & (b > 0)
    s = jnp.where(live, a, 1.0) ** alpha / jnp.where(live, b, 1.0) ** (1.0 - alpha)
    s = jnp.where(live, jnp.maximum(s, 1e-5), 1.0)
    return s if tie is None else s[tie]


@partial(jax.jit, static_argnames=("spec", "act_spec", "name", "slots"))
def _smooth(ws, act_absmax, alpha, tie, *, spec, act_spec, name, slots):
    w_absmax = jnp.max(jnp.stack([jnp.max(jnp.abs(wi.astype(jnp.float32)), axis=1) for wi in ws]), axis=0)
    s = smoothing_factors(act_absmax, w_absmax, alpha, tie, slots)
    smoothed = [(wi.astype(jnp.float32) * s[:, None]).astype(wi.dtype) for wi in ws]
    qs = [quantize_array(wi, spec, where=name, act_spec=act_spec) for wi in smoothed]
    return qs, smoothed, s


def smoothquant(
    w: jax.Array | Sequence[jax.Array],
    calib: CalibStats | jax.Array,
    spec: QuantSpec | str = QuantSpec(format="int8"),
    *,
    alpha: float = 0.5,
    act_spec: QuantSpec | None = PER_TOKEN_INT8,
    tie: jax.Array | np.ndarray | None = None,
    name: str = "",
) -> SmoothQuantResult:
    """Smooths and quantizes a Dense kernel ``w [K, N]`` (or several sharing one input).

    Args:
      w: a kernel or a sequence of kernels ``[K, N_i]`` reading the same input.
      calib: :class:`CalibStats` (only ``abs_max`` is used; the Hessian is not needed) or raw
        inputs ``[..., K]``.
      spec: the weight spec, per-channel int8 by default.
      alpha: migration strength in ``[0, 1]``.
      act_spec: activation spec recorded in the QArray's metadata (the serving recipe read by
        :mod:`jaxq.ops`); dynamic per-token int8 by default.
      tie: optional ``[K]`` map channel -> slot; channels of one slot share one factor (so that
        ``1/s`` can be folded into a ``v_proj`` shared by several query heads).
      name: layer name for error messages.
    """
    spec = as_spec(spec)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    ws, many, k = C.check_kernels(w, "smoothquant", name)
    stats = as_stats(calib, k, name, hessian=False)
    for wi in ws:
        spec.tiling(wi.shape, where=name)  # validate here: the jitted core has no per-layer name
    tie_arr, slots = C.check_tie(name, tie, k)
    qs, smoothed, s = _smooth(tuple(ws), stats.abs_max, alpha, tie_arr, spec=spec, act_spec=act_spec, name="", slots=slots)
    if many:
        return SmoothQuantResult(tuple(qs), tuple(smoothed), s)
    return SmoothQuantResult(qs[0], smoothed[0], s)


@partial(jax.jit, static_argnames=("act_spec",))
def w8a8_matmul(
    x: jax.Array, q: QArray | jax.Array, act_divisor: jax.Array | None = None, act_spec: QuantSpec = PER_TOKEN_INT8
) -> jax.Array:
    """Reference (simulated) W8A8 product ``Q_tok(x / s) @ dequant(q)`` in float32.

    The activations are fake-quantized per token with ``act_spec`` (dynamic int8); this is the
    numerics an int8 x int8 -> int32 kernel reproduces, used for evaluation and tests.
    """
    from jaxq.ste import fake_quant

    xs = x.astype(jnp.float32)
    if act_divisor is not None:
        xs = xs / act_divisor
    wq = q.dequantize(jnp.float32) if isinstance(q, QArray) else q.astype(jnp.float32)
    return jnp.dot(fake_quant(xs, act_spec), wq, precision=jax.lax.Precision.HIGHEST)
