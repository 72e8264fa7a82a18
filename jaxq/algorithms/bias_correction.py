r"""Bias correction: remove the mean output shift that quantization introduces (Nagel et al., 2019).

With ``\Delta = W - \hat W`` (``\hat W`` the dequantized kernel), the quantized layer's output
is off by ``E[y - \hat y] = E[x]\,\Delta`` on average. Adding it to the bias,

.. math::  b' = b + E[x]\,\Delta ,

makes the quantized layer unbiased on the calibration distribution. For a convolution
(Flax kernel ``[*window, C_in, C_out]``) every window position sees the same per-channel mean
(ignoring padding at the borders), so ``b' = b + E[x] \sum_{window} \Delta``.

Works with any quantized kernel: RTN, MSE clip, GPTQ, or AWQ/SmoothQuant outputs (pass their
``input_scale``/``act_divisor`` as ``input_scale``, then ``\hat W = diag(s)^{-1} deq(q)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.algorithms._common import check_channels
from jaxq.algorithms.stats import CalibStats
from jaxq.qarray import QArray


def _mean(calib: "CalibStats | jax.Array", k: int, name: str) -> jax.Array:
    if isinstance(calib, CalibStats):
        check_channels(name, calib.x_sum.shape, k)
        return calib.mean
    shape = tuple(getattr(calib, "shape", ()))
    check_channels(name, shape, k)
    return jnp.mean(calib.reshape(-1, k).astype(jnp.float32), axis=0)


def bias_correction(
    w: jax.Array,
    q: QArray | jax.Array,
    calib: CalibStats | jax.Array,
    bias: jax.Array | None = None,
    *,
    input_scale: jax.Array | None = None,
    name: str = "",
) -> jax.Array:
    """The corrected bias ``b + E[x] (W - \\hat W)`` ``[N]`` for a Dense or Conv kernel.

    Args:
      w: the float kernel, ``[K, N]`` (Dense) or ``[*window, K, N]`` (Conv).
      q: its quantized version (a QArray or a dequantized array of the same shape).
      calib: :class:`CalibStats` (its ``mean``) or raw layer inputs ``[..., K]`` (NHWC for conv).
      bias: the layer's current bias ``[N]`` (zero if ``None``).
      input_scale: if ``q`` quantizes ``diag(s) W`` (AWQ, SmoothQuant), the ``s`` it used.
      name: layer name for error messages.
    """
    if getattr(w, "ndim", 0) < 2:
        raise ValueError(f"weight for {name or 'layer'} has shape {tuple(getattr(w, 'shape', ()))}; expected [..., K, N]")
    k, n = int(w.shape[-2]), int(w.shape[-1])
    if tuple(q.shape) != tuple(w.shape):
        raise ValueError(f"quantized kernel for {name or 'layer'} has shape {tuple(q.shape)}; expected {tuple(w.shape)}")
    if input_scale is not None:
        check_channels(name, input_scale.shape, k, what="input_scale")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias for {name or 'layer'} has shape {tuple(bias.shape)}; expected ({n},)")
    return _corrected(w, q, _mean(calib, k, name), bias, input_scale)


@jax.jit
def _corrected(w, q, mean, bias, input_scale):
    k, n = w.shape[-2], w.shape[-1]
    wq = q.dequantize(jnp.float32) if isinstance(q, QArray) else jnp.asarray(q, jnp.float32)
    if input_scale is not None:
        wq = wq / input_scale.astype(jnp.float32)[:, None]
    delta = (w.astype(jnp.float32) - wq).reshape(-1, k, n).sum(axis=0)
    shift = jnp.dot(mean, delta, precision=jax.lax.Precision.HIGHEST)
    if bias is None:
        return shift
    return (bias.astype(jnp.float32) + shift).astype(bias.dtype)
