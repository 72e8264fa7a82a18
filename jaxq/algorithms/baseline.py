"""Data-free baselines: round-to-nearest (RTN) and the core's MSE clip search.

* RTN: ``jaxq.quantize_array(w, spec)`` with the spec's own range method (absmax by default).
* MSE clip: the same with ``range_method='mse'``: a per-scale-group clip ratio minimising the
  weight round-trip error ``||w - Q(w)||^2`` (see :func:`jaxq.numerics.ranges.mse_search`).
"""

from __future__ import annotations

from functools import partial

import jax

from jaxq.qarray import QArray, quantize_array
from jaxq.spec import QuantSpec, as_spec


@partial(jax.jit, static_argnames=("spec", "name"))
def _quantize(w, spec, name):
    return quantize_array(w, spec, where=name)


def rtn(w: jax.Array, spec: QuantSpec | str, *, name: str = "") -> QArray:
    """Round-to-nearest quantization (no calibration data)."""
    spec = as_spec(spec)
    if spec.fmt.has_scale:
        spec.tiling(w.shape, where=name)  # validate here: the jitted core has no per-layer name
    return _quantize(w, spec, "")


def mse_clip(w: jax.Array, spec: QuantSpec | str, *, name: str = "") -> QArray:
    """Quantization with the core's per-group MSE clip search (no calibration data)."""
    spec = as_spec(spec)
    if spec.fmt.kind in ("cast", "none"):
        return _quantize(w, spec, "")
    spec.tiling(w.shape, where=name)
    return _quantize(w, spec.replace(range_method="mse"), "")
