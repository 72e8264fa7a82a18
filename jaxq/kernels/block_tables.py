"""Block sizes per device, and where a kernel is known to beat XLA.

Two tables, both keyed by a canonical device name derived from
``jax.devices()[0].device_kind``:

* :data:`BLOCK_TABLE` - the tile sizes a kernel uses, per kernel kind
  (``"w8a8"``, ``"w8a16"``, ``"w4a16"``) and regime (``"decode"`` for M <= 16,
  ``"prefill"`` otherwise). Unknown devices get :func:`heuristic_config`.
* :data:`KERNEL_WINS` - the shapes where the kernel was *measured* faster than
  XLA on that device. Automatic dispatch uses a kernel only there, so the rule
  "a quantized matmul is never slower than XLA" holds by construction. Every
  entry must come from ``benchmarks/kernels.py`` on the device itself (its JSON
  output lists the winning cells); an empty table means "XLA everywhere".

The GPU block sizes follow the usual Triton int8/bf16 GEMM configurations and
the TPU ones the (8, 128) tiling rules with 32 sublanes for int8 operands. They
have not been tuned on hardware yet (this file says so until someone does).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxq.kernels.common import device_kind as current_kind

Kind = Literal["w8a8", "w8a16", "w4a16"]
Regime = Literal["decode", "prefill"]
DECODE_MAX_M = 16  # rows up to which a matmul is a GEMV-like, memory-bound "decode" call


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes (in logical elements: ``bk`` counts K before int4 packing).

    Attributes:
      bm, bn, bk: block rows of x, block columns of w, and K depth per step.
      split_k: GPU only: number of K slices run as separate programs and summed
        afterwards (decode: keeps every SM busy when N / bn is small); 0 = choose
        from the SM count.
      num_warps, num_stages: Triton launch parameters (ignored on TPU).
    """

    bm: int
    bn: int
    bk: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class WinRule:
    """A measured regime where the kernel beats XLA: ``m_min <= M <= m_max``.

    ``grouped`` restricts the rule to per-group (True) or per-channel (False)
    weights; None matches both. ``min_kn`` guards against small layers, where
    launch overhead dominates.
    """

    kind: Kind
    m_min: int
    m_max: int
    grouped: bool | None = None
    min_kn: int = 1024


def _gpu_table(stages: int) -> dict[tuple[str, str], BlockConfig]:
    return {
        ("w8a8", "prefill"): BlockConfig(128, 128, 128, num_warps=8, num_stages=stages),
        ("w8a16", "prefill"): BlockConfig(128, 128, 64, num_warps=8, num_stages=stages),
        ("w4a16", "prefill"): BlockConfig(128, 128, 128, num_warps=8, num_stages=stages),
        # Decode: M padded to 16 (the smallest Triton dot), narrow N tiles, deep K
        # tiles, and split-K so that N/bn * split >= 2 programs per SM.
        ("w8a8", "decode"): BlockConfig(16, 64, 256, split_k=0, num_warps=4, num_stages=4),
        ("w8a16", "decode"): BlockConfig(16, 64, 256, split_k=0, num_warps=4, num_stages=4),
        ("w4a16", "decode"): BlockConfig(16, 64, 512, split_k=0, num_warps=4, num_stages=4),
    }


def _tpu_table(bn: int, bk: int) -> dict[tuple[str, str], BlockConfig]:
    # int8 operands pack 32 rows per vreg, bf16 16: decode pads M to that.
    return {
        ("w8a8", "prefill"): BlockConfig(256, bn, bk),
        ("w8a16", "prefill"): BlockConfig(256, bn, bk),
        ("w4a16", "prefill"): BlockConfig(256, bn, 2 * bk),
        ("w8a8", "decode"): BlockConfig(32, 2 * bn, 2 * bk),
        ("w8a16", "decode"): BlockConfig(16, 2 * bn, 2 * bk),
        ("w4a16", "decode"): BlockConfig(16, 2 * bn, 4 * bk),
    }


_CPU = BlockConfig(32, 128, 128)  # interpret mode: few, mid-sized grid steps are fastest

BLOCK_TABLE: dict[str, dict[tuple[str, str], BlockConfig]] = {
    "H100": _gpu_table(stages=3),
    "H200": _gpu_table(stages=3),
    "A100": _gpu_table(stages=3),
    "TPU v5e": _tpu_table(bn=256, bk=512),
    "TPU v5p": _tpu_table(bn=256, bk=512),
    "TPU v6e": _tpu_table(bn=512, bk=512),
    "TPU v4": _tpu_table(bn=256, bk=512),
    "cpu": {(k, r): _CPU for k in ("w8a8", "w8a16", "w4a16") for r in ("decode", "prefill")},
}

# Streaming multiprocessors, for the split-K heuristic.
SM_COUNT: dict[str, int] = {"H100": 132, "H200": 132, "A100": 108}

# Measured wins only (see the module docstring). Nothing has been measured yet.
KERNEL_WINS: dict[str, list[WinRule]] = {
    "H100": [],
    "H200": [],
    "A100": [],
    "TPU v5e": [],
    "TPU v5p": [],
    "TPU v6e": [],
    "TPU v4": [],
    "cpu": [],  # interpret mode is never faster than XLA
}


def canonical_device(device_kind: str) -> str:
    """Maps a ``device_kind`` string to a table key (``'unknown-gpu'`` etc. when absent)."""
    s = device_kind.lower()
    for key, needles in (
        ("H200", ("h200",)),
        ("H100", ("h100",)),
        ("A100", ("a100",)),
        ("TPU v6e", ("v6 lite", "v6e")),
        ("TPU v5e", ("v5 lite", "v5e", "v5litepod")),
        ("TPU v5p", ("v5p", "tpu v5")),
        ("TPU v4", ("tpu v4",)),
        ("cpu", ("cpu",)),
    ):
        if any(n in s for n in needles):
            return key
    if "tpu" in s:
        return "unknown-tpu"
    if any(n in s for n in ("nvidia", "gpu", "amd", "radeon", "instinct")):
        return "unknown-gpu"
    return "unknown"


def has_int8_units(device_kind: str | None = None) -> bool:
    """Whether the chip multiplies int8 natively (TPU7x has no integer MXU; V100/P100 no int8 tensor cores)."""
    s = (current_kind() if device_kind is None else device_kind).lower()
    return not any(n in s for n in ("tpu7", "tpu v7", "v100", "p100"))


def regime(m: int) -> Regime:
    return "decode" if m <= DECODE_MAX_M else "prefill"


def heuristic_config(kind: Kind, m: int, target: str) -> BlockConfig:
    """Block sizes for a device missing from :data:`BLOCK_TABLE`.

    GPU: the H100 table with two pipeline stages (fits the shared memory of
    smaller parts). TPU: the v5e table (the smallest MXU and VMEM of current chips).
    """
    table = _gpu_table(stages=2) if target == "gpu" else _tpu_table(bn=256, bk=512)
    return table[(kind, regime(m))]


def block_config(kind: Kind, m: int, target: str, device_kind: str | None = None) -> BlockConfig:
    """The table entry for this device, kernel kind and M (or the heuristic)."""
    key = canonical_device(current_kind() if device_kind is None else device_kind)
    table = BLOCK_TABLE.get(key)
    if table is None:
        return heuristic_config(kind, m, target)
    return table[(kind, regime(m))]


def sm_count(device_kind: str | None = None) -> int:
    key = canonical_device(current_kind() if device_kind is None else device_kind)
    if key == "cpu" or "tpu" in key.lower():
        return 1  # no split-K: interpret mode runs programs one by one, TPU cores loop over K
    return SM_COUNT.get(key, 100)


def kernel_wins(kind: Kind, m: int, k: int, n: int, grouped: bool, device_kind: str | None = None) -> bool:
    """Whether a measured rule says the kernel beats XLA for this call on this device."""
    key = canonical_device(current_kind() if device_kind is None else device_kind)
    for rule in KERNEL_WINS.get(key, ()):
        if rule.kind != kind or not rule.m_min <= m <= rule.m_max or min(k, n) < rule.min_kn:
            continue
        if rule.grouped is None or rule.grouped == grouped:
            return True
    return False


def register_kernel_win(device: str, rule: WinRule) -> None:
    """Adds a measured win (e.g. from ``benchmarks/kernels.py --json``) for a device key."""
    KERNEL_WINS.setdefault(canonical_device(device) if device not in KERNEL_WINS else device, []).append(rule)
