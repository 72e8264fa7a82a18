"""Flax integration: drop-in layers, QAT tree transform, calibration, mixed precision.

* ``from jaxq.flax import linen as nn`` / ``from jaxq.flax import nnx``: Flax
  with ``Dense``/``DenseGeneral``/``Conv``/``Einsum`` (linen) and
  ``Linear``/``LinearGeneral``/``Conv``/``Einsum`` (nnx) whose official hooks
  default to jaxq's ops, so they run directly on trees from :func:`jaxq.quantize`.
* :func:`qat_params` / :func:`init_qat_scales`: quantization-aware training as a
  tree transform (STE or LSQ), driven by the same policy that serves.
* :func:`calibrate`: static activation scales keyed by module path (linen;
  ``jaxq.flax.nnx.calibrate`` for nnx).
* :class:`MixedPrecision`, :class:`DynamicLossScale`, :func:`loss_scaled`:
  compute/param/output dtypes and fp16 loss scaling.
"""

from jaxq.flax import hooks
from jaxq.flax.calibration import STATS, calibrate
from jaxq.flax.loss_scale import (
    DynamicLossScale,
    LossScaledState,
    LossScaleState,
    all_finite,
    loss_scaled,
    scaled_train_step,
)
from jaxq.flax.mixed_precision import MixedPrecision
from jaxq.flax.qat import init_qat_scales, qat_params
from jaxq.flax.qat_weight import QatMeta, QatWeight, is_qat_weight
from jaxq.flax import linen, nnx  # noqa: E402  (after the names they use)

__all__ = [
    "DynamicLossScale",
    "LossScaleState",
    "LossScaledState",
    "MixedPrecision",
    "QatMeta",
    "QatWeight",
    "STATS",
    "all_finite",
    "calibrate",
    "hooks",
    "init_qat_scales",
    "is_qat_weight",
    "linen",
    "loss_scaled",
    "nnx",
    "qat_params",
    "scaled_train_step",
]
