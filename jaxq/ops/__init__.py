"""Ops that accept QArrays: the quantized matmul and Flax-hook-compatible wrappers."""

from jaxq.ops.activations import activation_scale, quantize_activation
from jaxq.ops.gather import take
from jaxq.ops.general import conv_general_dilated, dot_general, einsum
from jaxq.ops.qmatmul import IMPLS, choose_impl, qmatmul

__all__ = [
    "IMPLS",
    "activation_scale",
    "choose_impl",
    "conv_general_dilated",
    "dot_general",
    "einsum",
    "qmatmul",
    "quantize_activation",
    "take",
]
