"""Image classifiers for the recipe flow: the classic MLP (784-128-10) and a small CNN.

The layers come from :mod:`jaxq.flax.linen` by default: drop-in ``Dense`` and
``Conv`` with the same parameter trees as ``flax.linen``, which run float params
as float and ``jaxq.quantize``-d params quantized. So one model definition
serves the float model, every PTQ strategy and QAT::

    model = MLP(hidden=(128,))
    params = model.init(key, x)                     # float
    logits = model.apply(params, x)
    logits = model.apply(jaxq.quantize(params, "int8"), x)   # int8 weights

Pass ``layers=flax.linen`` for plain Flax layers (e.g. to hand the same
architecture to another quantization library).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import flax.linen as nn
import jax

__all__ = ["CNN", "MLP", "build_classifier"]


def _layers(layers: Any) -> Any:
    if layers is not None:
        return layers
    from jaxq.flax import linen as qnn  # above jaxq.models in the layer order only at call time

    return qnn


class MLP(nn.Module):
    """Flatten, hidden ``Dense`` + ReLU layers, then a ``Dense`` to the classes.

    Attributes:
      hidden: hidden widths; ``(128,)`` on 28x28 inputs is the classic 784-128-10.
      num_classes: output logits.
      layers: namespace providing ``Dense`` (default :mod:`jaxq.flax.linen`).
    """

    hidden: Sequence[int] = (128,)
    num_classes: int = 10
    layers: ModuleType | Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        L = _layers(self.layers)
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(L.Dense(width)(x))
        return L.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """``[Conv 3x3 + ReLU + 2x2 max-pool] * len(channels)``, flatten, hidden Dense + ReLU, classifier.

    Attributes:
      channels: output channels of the conv blocks.
      hidden: hidden widths of the Dense head.
      num_classes: output logits.
      layers: namespace providing ``Dense`` and ``Conv`` (default :mod:`jaxq.flax.linen`).
    """

    channels: Sequence[int] = (16, 32)
    hidden: Sequence[int] = (128,)
    num_classes: int = 10
    layers: ModuleType | Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        L = _layers(self.layers)
        for c in self.channels:
            x = nn.relu(L.Conv(c, (3, 3), padding="SAME")(x))
            if x.shape[1] >= 2 and x.shape[2] >= 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(L.Dense(width)(x))
        return L.Dense(self.num_classes)(x)


def build_classifier(
    arch: str,
    num_classes: int,
    *,
    hidden: Sequence[int] = (128,),
    channels: Sequence[int] = (16, 32),
    layers: Any = None,
) -> nn.Module:
    """A classifier by name: ``"mlp"`` or ``"cnn"``."""
    if arch == "mlp":
        return MLP(hidden=tuple(hidden), num_classes=num_classes, layers=layers)
    if arch == "cnn":
        return CNN(channels=tuple(channels), hidden=tuple(hidden), num_classes=num_classes, layers=layers)
    raise ValueError(f"unknown arch {arch!r}; choose 'mlp' or 'cnn'")
