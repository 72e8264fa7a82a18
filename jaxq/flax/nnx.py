"""``flax.nnx`` with quantization-aware drop-in layers: ``from jaxq.flax import nnx``.

Everything in :mod:`flax.nnx` is re-exported unchanged, except ``Linear``,
``LinearGeneral``, ``Conv`` and ``Einsum``: subclasses whose hook defaults are
jaxq's (``dot_general`` / ``conv_general_dilated`` / ``einsum_op`` and
``promote_dtype`` from :mod:`jaxq.flax.hooks`). Same constructor arguments, same
``Param`` tree, same float numerics as Flax; on quantized state they run
:mod:`jaxq.ops` on the stored codes::

    from jaxq.flax import nnx
    model = MyModel(rngs=nnx.Rngs(0))                  # built from jaxq.flax.nnx layers
    nnx.update(model, jaxq.quantize(nnx.state(model, nnx.Param), "int8"))
    y = model(x)                                       # int8 weights, jaxq ops

(:func:`quantize_model` does the middle line.) Static activation scales:
:func:`calibrate` records the inputs of each W8A8 layer over a few batches and
stores the frozen scale on the layer as an :class:`ActScale` variable (not a
``Param``, so optimizers and the param tree ignore it).
"""

from __future__ import annotations

import builtins
import contextvars
from typing import Any, Callable, Iterable

import flax.nnx as _nnx
import jax
import numpy as np
from flax.nnx import *  # noqa: F401,F403  (the rest of flax.nnx, unchanged)

from jaxq.flax import hooks
from jaxq.flax.calibration import (
    DEFAULT_PERCENTILE,
    CalibrationMethod,
    activation_stats,
    calibration_percentile,
    reduce_stats,
    scale_from_range,
)
from jaxq.flax.qat_weight import QatWeight
from jaxq.policy import Policy, Rule, as_policy
from jaxq.qarray import QArray, is_qarray
from jaxq.quantize import quantize as _quantize

__all__ = [
    "ActScale",
    "Conv",
    "Einsum",
    "Linear",
    "LinearGeneral",
    "QuantStats",
    "calibrate",
    "quantize_model",
]


def __getattr__(name: str) -> Any:  # anything else: straight from flax.nnx
    return getattr(_nnx, name)


class QuantStats(_nnx.Intermediate):
    """Calibration statistics sown by the jaxq nnx layers (captured with ``nnx.capture``)."""


class ActScale(_nnx.Variable):
    """A frozen static activation scale stored on a layer by :func:`calibrate`."""


_CALIBRATING: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxq_nnx_calibrating", default=False)


class _KernelRef:
    """Answers ``variable[...]`` with a QArray (nnx variables index their value; QArrays do not index)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any):
        self._value = value

    def __getitem__(self, index: Any) -> Any:
        return self._value


class _LayerView:
    """Read-only view of a layer whose ``kernel`` is a QArray; everything else is the layer's."""

    def __init__(self, layer: Any, kernel: QArray):
        # `builtins.object`: flax.nnx exports its own `object` (re-exported here).
        builtins.object.__setattr__(self, "_layer", layer)
        builtins.object.__setattr__(self, "kernel", _KernelRef(kernel))

    def __getattr__(self, name: str) -> Any:
        return getattr(builtins.object.__getattribute__(self, "_layer"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a quantized layer view is read-only")


class _QuantLayerMixin:
    """Shared ``__call__`` logic: calibration capture, static scale, QArray kernels."""

    def _quant_call(self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if _CALIBRATING.get():
            for name, value in activation_stats(inputs).items():
                self.sow(QuantStats, name, value)
        act_scale = getattr(self, "act_scale", None)
        scale = act_scale.get_value() if isinstance(act_scale, ActScale) else None
        kernel = self.kernel.get_value()
        target = _LayerView(self, kernel) if isinstance(kernel, QArray) else self
        with hooks.static_act_scale(scale):
            return call(target, inputs, *args, **kwargs)


class Linear(_QuantLayerMixin, _nnx.Linear):
    """``flax.nnx.Linear`` with jaxq hooks (see module docstring)."""

    def __init__(self, *args: Any, dot_general: Any = hooks.dot_general,
                 promote_dtype: Any = hooks.nnx_promote_dtype, **kwargs: Any):
        super().__init__(*args, dot_general=dot_general, promote_dtype=promote_dtype, **kwargs)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        return self._quant_call(_nnx.Linear.__call__, inputs, out_sharding=out_sharding)


class LinearGeneral(_QuantLayerMixin, _nnx.LinearGeneral):
    """``flax.nnx.LinearGeneral`` with jaxq hooks (see module docstring)."""

    def __init__(self, *args: Any, dot_general: Any = hooks.dot_general,
                 promote_dtype: Any = hooks.nnx_promote_dtype, **kwargs: Any):
        super().__init__(*args, dot_general=dot_general, promote_dtype=promote_dtype, **kwargs)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        return self._quant_call(_nnx.LinearGeneral.__call__, inputs, out_sharding=out_sharding)


class Conv(_QuantLayerMixin, _nnx.Conv):
    """``flax.nnx.Conv`` with jaxq hooks (see module docstring)."""

    def __init__(self, *args: Any, conv_general_dilated: Any = hooks.conv_general_dilated,
                 promote_dtype: Any = hooks.nnx_promote_dtype, **kwargs: Any):
        super().__init__(*args, conv_general_dilated=conv_general_dilated, promote_dtype=promote_dtype, **kwargs)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        return self._quant_call(_nnx.Conv.__call__, inputs, out_sharding=out_sharding)


class Einsum(_QuantLayerMixin, _nnx.Einsum):
    """``flax.nnx.Einsum`` with jaxq hooks (see module docstring)."""

    def __init__(self, *args: Any, einsum_op: Any = hooks.einsum,
                 promote_dtype: Any = hooks.nnx_promote_dtype, **kwargs: Any):
        super().__init__(*args, einsum_op=einsum_op, promote_dtype=promote_dtype, **kwargs)

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None) -> jax.Array:
        return self._quant_call(_nnx.Einsum.__call__, inputs, einsum_str, out_sharding=out_sharding)


QUANT_LAYERS = (Linear, LinearGeneral, Conv, Einsum)


def quantize_model(model: Any, policy: Policy | str | Rule | None = None, **kwargs: Any) -> Any:
    """Quantizes ``model``'s ``Param`` state in place with :func:`jaxq.quantize`; returns the model.

    The float weights are replaced (not kept). ``kwargs`` go to :func:`jaxq.quantize`
    (``strict``, ``scales``); paths look like ``layer/kernel/value``.
    """
    _nnx.update(model, _quantize(_nnx.state(model, _nnx.Param), policy, **kwargs))
    return model


def _layers_by_path(model: Any) -> dict[tuple[str, ...], Any]:
    return {tuple(str(p) for p in path): m for path, m in _nnx.iter_graph(model) if isinstance(m, QUANT_LAYERS)}


def _kernel_act_spec(layer: Any, path: tuple[str, ...], policy: Policy | None):
    kernel = layer.kernel.get_value()
    if is_qarray(kernel):
        return kernel.meta.act_spec
    if policy is None or isinstance(kernel, QatWeight):
        return None
    kernel_path = "/".join(path + ("kernel", "value"))
    rule = policy.match(kernel_path, len(np.shape(kernel)))
    if rule is None or rule.weight is None or rule.weight.fmt.kind == "none":
        return None
    return rule.activation


def calibrate(
    model: Any,
    batches: Iterable[Any],
    policy: Policy | str | Rule | None = None,
    *,
    method: CalibrationMethod = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    forward: Callable[[Any, Any], Any] | None = None,
    jit: bool = True,
) -> dict[str, jax.Array]:
    """Calibrates static activation scales of an nnx model and stores them on its layers.

    Args:
      model: an nnx module built from :mod:`jaxq.flax.nnx` layers (float or quantized).
      batches: an iterable of inputs.
      policy: the serving policy (decides which layers are W8A8); QArray kernels
        use their own ``meta.act_spec``.
      method: ``"minmax"`` or ``"percentile"`` (see :func:`jaxq.flax.calibrate`).
      percentile: used by ``"percentile"``.
      forward: ``forward(model, batch)``; default ``model(batch)``.
      jit: run the calibration forward pass under ``jax.jit`` (on a split/merged copy).

    Returns:
      ``{module path: scale}`` for the calibrated layers; each such layer now
      has ``layer.act_scale = ActScale(scale)`` and serves with it.
    """
    policy = None if policy is None else as_policy(policy)
    forward = forward or (lambda m, b: m(b))
    graphdef, state = _nnx.split(model)

    def stats_of(state, batch):
        _, stats = _nnx.capture(forward, QuantStats)(_nnx.merge(graphdef, state), batch)
        return _nnx.to_pure_dict(stats)

    captured = []
    token = _CALIBRATING.set(True)
    try:
        with calibration_percentile(percentile):
            fn = jax.jit(stats_of) if jit else stats_of
            for batch in batches:
                captured.append(jax.device_get(fn(state, batch)))
    finally:
        _CALIBRATING.reset(token)
    if not captured:
        raise ValueError("calibrate got no batches")
    ranges = reduce_stats(captured, method)
    layers = _layers_by_path(model)
    out: dict[str, jax.Array] = {}
    for path, r in sorted(ranges.items()):
        layer = layers.get(path)
        if layer is None:
            continue
        spec = _kernel_act_spec(layer, path, policy)
        if spec is None:
            continue
        scale = scale_from_range(r, spec)
        layer.act_scale = ActScale(scale)
        out["/".join(path)] = scale
    if not out:
        raise ValueError(
            f"calibrate found no W8A8 layer among {['/'.join(p) for p in ranges]}; use a policy with "
            "activation specs (e.g. 'w8a8')"
        )
    return out

