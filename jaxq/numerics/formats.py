"""Number formats that jaxq can store a tensor in.

A :class:`Format` says how one real number becomes a stored code and back:

* ``int``       uniform integers (int8, int4, int3, int2), symmetric or with a zero point;
* ``float``     low-precision floats (fp8 e4m3 / e5m2) with a per-block scale;
* ``codebook``  a fixed table of values (nf4) indexed by a 4-bit code, with a scale;
* ``cast``      a plain cast to bf16 / fp16 (no scale);
* ``none``      fp32: the leaf is left untouched.

Formats are immutable and looked up by name with :func:`get_format`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np

FormatKind = Literal["int", "float", "codebook", "cast", "none"]

# QLoRA's NormalFloat4 codebook (Dettmers et al. 2023, appendix E): quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero.
NF4_CODEBOOK = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)


@dataclasses.dataclass(frozen=True)
class Format:
    """A storage format.

    Attributes:
      name: canonical name, e.g. ``"int4"``.
      kind: family of the format (see module docstring).
      bits: information bits per element.
      storage_dtype: dtype of the stored values array.
      packed: whether codes are packed below one byte each (two per byte for int4/nf4, four
        per byte for int2, eight per three bytes for int3).
      max_value: largest representable magnitude of the code (127 for int8,
        448 for fp8 e4m3, 1 for nf4); ``None`` for casts.
    """

    name: str
    kind: FormatKind
    bits: int
    storage_dtype: np.dtype
    packed: bool = False
    max_value: float | None = None

    @property
    def has_scale(self) -> bool:
        return self.kind in ("int", "float", "codebook")

    def int_range(self, symmetric: bool, full_range: bool = False) -> tuple[int, int]:
        """The integer code range ``[qmin, qmax]`` of an ``int`` format.

        Narrow symmetric grids drop the most negative code (e.g. -128 for int8) so
        that the grid is symmetric around an exact zero. Asymmetric grids, and
        symmetric ones with ``full_range``, use every code.
        """
        if self.kind != "int":
            raise ValueError(f"int_range is only defined for int formats, not {self.name!r}")
        half = 2 ** (self.bits - 1)
        return (-(half - 1), half - 1) if symmetric and not full_range else (-half, half - 1)

    def symmetric_bound(self, full_range: bool = False) -> float:
        """The code-domain magnitude that a symmetric scale maps the range's absmax onto.

        Narrow: ``qmax`` (7 for int4). Full range: ``qmax + 0.5`` (7.5 for int4), so the
        absmax lands on the edge of the top bucket; values there round to ``-2**(b-1)``
        on the negative side and clip to ``qmax`` on the positive side (at most half a
        step), which buys one more level: 16 instead of 15 for int4, 8 instead of 7 for
        int3, 4 instead of 3 for int2.
        """
        if self.kind != "int":
            return float(self.max_value)
        qmax = 2 ** (self.bits - 1) - 1
        return qmax + 0.5 if full_range else float(qmax)

    @property
    def pack_codes(self) -> int:
        """Codes per packing unit: 2 for 4-bit formats, 4 for int2, 8 for int3, else 1."""
        if not self.packed:
            return 1
        return 8 // self.bits if 8 % self.bits == 0 else 8

    @property
    def pack_bytes(self) -> int:
        """Bytes per packing unit: 3 for int3 (eight 3-bit codes), else 1."""
        return self.pack_codes * self.bits // 8 if self.packed else 1

    def storage_bits_per_element(self) -> float:
        """Bits that one element really takes in memory (container included)."""
        return 8.0 * np.dtype(self.storage_dtype).itemsize * self.pack_bytes / self.pack_codes


_FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("int8", "int", 8, np.dtype(np.int8), max_value=127),
        Format("int4", "int", 4, np.dtype(np.int8), packed=True, max_value=7),
        # int3 packs eight codes into three bytes; int2 packs four per byte.
        Format("int3", "int", 3, np.dtype(np.int8), packed=True, max_value=3),
        Format("int2", "int", 2, np.dtype(np.int8), packed=True, max_value=1),
        Format("fp8_e4m3", "float", 8, np.dtype(ml_dtypes.float8_e4m3fn), max_value=448.0),
        Format("fp8_e5m2", "float", 8, np.dtype(ml_dtypes.float8_e5m2), max_value=57344.0),
        Format("nf4", "codebook", 4, np.dtype(np.int8), packed=True, max_value=1.0),
        Format("bf16", "cast", 16, np.dtype(jnp.bfloat16)),
        Format("fp16", "cast", 16, np.dtype(np.float16)),
        Format("fp32", "none", 32, np.dtype(np.float32)),
    )
}

_ALIASES = {
    "fp8": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "float8_e4m3fn": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
}


def format_names() -> tuple[str, ...]:
    """All canonical format names."""
    return tuple(_FORMATS)


def get_format(name: str | Format) -> Format:
    """Looks a format up by name (aliases such as ``"fp8"`` are accepted)."""
    if isinstance(name, Format):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _FORMATS:
        raise ValueError(
            f"unknown format {name!r}; choose one of {sorted(_FORMATS)} "
            f"(aliases: {sorted(_ALIASES)})"
        )
    return _FORMATS[key]
