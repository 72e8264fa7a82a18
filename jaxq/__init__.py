"""jaxq: functional quantization for JAX and Flax.

Layers, bottom up: ``numerics`` (formats, packing, ranges) -> ``qarray`` (the
QArray pytree) -> ``policy`` / ``quantize`` (tree transforms) -> ``ops`` and
``kernels`` -> ``flax`` adapters -> ``algorithms`` -> ``io`` and the command line.
"""

from jaxq import ops
from jaxq.algorithms.auto_policy import AutoPolicyReport, BitsPerWeight, Bytes, allocate, auto_policy
from jaxq.algorithms.sensitivity import sensitivity_table
from jaxq.io import CheckpointError, load, save
from jaxq.numerics.formats import format_names
from jaxq.policy import PRESETS, Policy, Rule, as_policy
from jaxq.qarray import QArray, QMeta, is_qarray, quantize_array
from jaxq.quantize import dequantize, quantize, summarize, tree_nbytes
from jaxq.spec import QuantSpec
from jaxq.ste import fake_quant, fake_quant_lsq, initial_scale

__version__ = "0.1.0"

__all__ = [
    "AutoPolicyReport",
    "BitsPerWeight",
    "Bytes",
    "allocate",
    "auto_policy",
    "sensitivity_table",
    "CheckpointError",
    "PRESETS",
    "Policy",
    "QArray",
    "QMeta",
    "QuantSpec",
    "Rule",
    "as_policy",
    "dequantize",
    "fake_quant",
    "fake_quant_lsq",
    "format_names",
    "initial_scale",
    "is_qarray",
    "load",
    "ops",
    "quantize",
    "quantize_array",
    "save",
    "summarize",
    "tree_nbytes",
]
