"""The rounding grid a spec asks of an algorithm, with an int format's code range as data.

The calibration algorithms are jitted. Keyed on the whole :class:`~jaxq.spec.QuantSpec`, they
would compile again for every bit width, though int2 ... int8 differ only in two numbers, the
code range ``[qmin, qmax]``. :class:`Grid` is a pytree whose only leaf is ``half = 2**(bits-1)``
for int formats; everything else (format family, symmetry, full range, range method) is static
structure. Passed to a jitted core as an ordinary argument, it lets one compilation per kernel
shape serve every int bit width: a W3 pass right after a W4 pass of the same layers reuses the
W4 executables.

Inside a trace the format is an :class:`IntCodes`, which offers the int part of
:class:`~jaxq.numerics.formats.Format` (``kind``, ``int_range``, ``symmetric_bound``) with
traced values, so :mod:`jaxq.numerics.codec` and :mod:`jaxq.numerics.ranges` run on it
unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxq.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class IntCodes:
    """An int format of ``log2(2 * half)`` bits whose ``half`` may be a traced scalar."""

    half: Any
    kind: str = "int"
    name: str = "int"

    def int_range(self, symmetric: bool, full_range: bool = False) -> tuple[Any, Any]:
        h = self.half
        return (-(h - 1), h - 1) if symmetric and not full_range else (-h, h - 1)

    def symmetric_bound(self, full_range: bool = False) -> Any:
        return self.half - 0.5 if full_range else self.half - 1.0


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Grid:
    """Numerics of a weight spec for the algorithms: format, symmetry, full range, range method."""

    fmt: Any  # a Format, or IntCodes for int formats
    symmetric: bool
    full_range: bool
    range_method: str
    percentile: float

    @classmethod
    def of(cls, spec: QuantSpec) -> "Grid":
        fmt = spec.fmt
        if fmt.kind == "int":
            fmt = IntCodes(np.float32(2 ** (fmt.bits - 1)))
        return cls(fmt, spec.symmetric, bool(spec.full_range), spec.range_method, float(spec.percentile))

    def tree_flatten(self):
        aux = (self.symmetric, self.full_range, self.range_method, self.percentile)
        if isinstance(self.fmt, IntCodes):
            return (self.fmt.half,), ("int",) + aux  # np.float32 from Grid.of, or a tracer
        return (), (self.fmt,) + aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        fmt = IntCodes(children[0]) if aux[0] == "int" else aux[0]
        return cls(fmt, *aux[1:])
