"""Pallas kernels for quantized matmuls (TPU via Mosaic, GPU via Triton, CPU via interpret mode).

Kernels take raw arrays, not QArrays (``jaxq.ops.qmatmul`` does that mapping
through :mod:`jaxq.kernels.dispatch`):

* :func:`w8a8_matmul` / :func:`w8a8_matmul_int32` / :func:`w8a8_matmul_dynamic` -
  int8 activations x int8 (or int4) weights with int32 accumulation;
* :func:`weight_only_matmul` (:func:`w8a16_matmul`, :func:`w4a16_matmul`) - float
  activations x int8 / packed int4 weights, dequantized inside the kernel.

Block sizes come from :mod:`jaxq.kernels.block_tables`. Every kernel has an
``interpret`` flag and runs on CPU with ``interpret=True``.
"""

from jaxq.kernels.block_tables import BlockConfig, WinRule, block_config, register_kernel_win
from jaxq.kernels.w8a8 import w8a8_matmul, w8a8_matmul_dynamic, w8a8_matmul_int32
from jaxq.kernels.weight_only import w4a16_matmul, w8a16_matmul, weight_only_matmul

__all__ = [
    "BlockConfig",
    "WinRule",
    "block_config",
    "register_kernel_win",
    "w4a16_matmul",
    "w8a16_matmul",
    "w8a8_matmul",
    "w8a8_matmul_dynamic",
    "w8a8_matmul_int32",
    "weight_only_matmul",
]
