"""`QuantSpec`: how to quantize one tensor (format, granularity, symmetry, range method).

Specs are frozen and validated on construction, so a bad setting fails where it
is written, not deep inside a jitted function. A spec says nothing about *which*
tensors it applies to; that is the job of :mod:`jaxq.policy`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from jaxq.numerics.formats import Format, get_format
from jaxq.numerics.ranges import RANGE_METHODS
from jaxq.numerics.tiling import Tiling

Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token"]
GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel", "per_group", "per_token")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Attributes:
      format: storage format name (see :func:`jaxq.numerics.format_names`), e.g.
        ``"int8"``, ``"int4"``, ``"nf4"``, ``"fp8_e4m3"``, ``"bf16"``.
      granularity: ``"per_tensor"``, ``"per_channel"`` (one scale per index of
        ``channel_axes``), ``"per_group"`` (groups of ``group_size`` along
        ``group_axis``, and per channel), or ``"per_token"`` (activations: one
        scale per row, i.e. all axes but the last are channels).
      group_size: elements per group for ``"per_group"``.
      symmetric: symmetric (no zero point) or asymmetric (with a zero point).
      range_method: ``"absmax"``, ``"minmax"``, ``"percentile"`` or ``"mse"``.
      percentile: the percentile for ``range_method="percentile"``.
      channel_axes: axes with their own scale; ``None`` means the last axis (the
        output channel of a Flax ``Dense``/``Conv`` kernel). Add the layer axis
        of a stacked (scanned) kernel here, e.g. ``(0, -1)``.
      group_axis: the axis cut into groups; ``-2`` is the input (contraction)
        axis of Flax ``Dense`` and ``Conv`` kernels.
      scale_dtype: dtype of the stored scales.
      full_range: for symmetric ``int`` formats, use every code, ``[-2**(b-1), 2**(b-1)-1]``
        (the absmax maps onto ``qmax + 0.5``), instead of the narrow grid ``[-qmax, qmax]``.
        That is one more level, which matters at low bit widths (16 vs 15 for int4, 4 vs 3
        for int2). ``None`` (the default) picks full range for int formats of 4 bits or
        fewer and narrow for int8, whose symmetric grid int8 x int8 dots and activation
        quantization rely on. Asymmetric grids always use every code (stored as ``False``).
      zero_point_domain: where an asymmetric grid's zero point lives: ``"code"`` (an integer on
        the code grid, ``x = (c - zp) * s``, the range widened to contain 0) or ``"value"``
        (the real value of the lowest code, ``x = (c - qmin) * s + zp`` with ``zp = min``:
        GGUF's Q4_1). ``"value"`` applies to asymmetric int formats only.
    """

    format: str = "int8"
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    symmetric: bool = True
    range_method: str = "absmax"
    percentile: float = 99.9
    channel_axes: tuple[int, ...] | None = None
    group_axis: int = -2
    scale_dtype: str = "float32"
    full_range: bool | None = None
    zero_point_domain: str = "code"

    def __post_init__(self):
        fmt = get_format(self.format)  # raises on unknown formats, with the list
        object.__setattr__(self, "format", fmt.name)
        if self.full_range and fmt.kind != "int":
            raise ValueError(f"full_range applies to int formats only, not {fmt.name!r}; leave it unset")
        full = (fmt.kind == "int" and fmt.bits <= 4) if self.full_range is None else self.full_range
        # Stored False for asymmetric grids: they use every code anyway.
        object.__setattr__(self, "full_range", bool(full and self.symmetric))
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        if isinstance(self.group_size, np.integer):  # np.int64(32) from a shape computation is fine
            object.__setattr__(self, "group_size", int(self.group_size))
        if self.granularity == "per_group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"per_group needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} needs granularity='per_group', not {self.granularity!r}")
        if self.range_method not in RANGE_METHODS:
            raise ValueError(f"unknown range_method {self.range_method!r}; choose one of {RANGE_METHODS}")
        if not self.symmetric and fmt.kind in ("float", "codebook"):
            raise ValueError(f"format {fmt.name!r} is symmetric only; set symmetric=True or use an int format")
        if self.zero_point_domain not in ("code", "value"):
            raise ValueError(f"zero_point_domain must be 'code' or 'value', got {self.zero_point_domain!r}")
        if self.zero_point_domain == "value" and (fmt.kind != "int" or self.symmetric):
            raise ValueError(
                f"zero_point_domain='value' needs an asymmetric int format, not {fmt.name!r} "
                f"with symmetric={self.symmetric}; set symmetric=False or zero_point_domain='code'"
            )
        if self.channel_axes is not None:
            axes = tuple(self.channel_axes)
            bad = [a for a in axes if isinstance(a, bool) or not isinstance(a, (int, np.integer))]
            if bad:
                raise ValueError(f"channel_axes must be integer axes, got {bad} in {axes!r}; e.g. channel_axes=(0, -1)")
            object.__setattr__(self, "channel_axes", tuple(int(a) for a in axes))
        if isinstance(self.group_axis, bool) or not isinstance(self.group_axis, (int, np.integer)):
            raise ValueError(f"group_axis must be an integer axis, got {self.group_axis!r}; -2 is a Dense kernel's input axis")
        object.__setattr__(self, "group_axis", int(self.group_axis))
        np.dtype(self.scale_dtype)  # raises on a bad dtype name

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    def replace(self, **changes) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def tiling(self, shape: Sequence[int], where: str = "") -> Tiling:
        """The scale tiling this spec gives a tensor of ``shape`` (validated)."""
        ndim = len(shape)
        if self.granularity == "per_tensor":
            chans: Sequence[int] = self.channel_axes or ()
        elif self.granularity == "per_token":
            chans = tuple(range(ndim - 1))
        else:
            chans = self.channel_axes if self.channel_axes is not None else ((-1,) if ndim else ())
        if self.granularity == "per_group":
            return Tiling.make(shape, chans, self.group_axis, self.group_size, where=where)
        return Tiling.make(shape, chans, where=where)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def fit_group(self, length: int) -> "QuantSpec":
        """This spec with its group size fitted to an axis of ``length`` elements.

        A group size that divides ``length`` (or a spec without groups) is kept; otherwise the
        largest divisor of ``length`` below it that is a multiple of 32 (else of 8) is used, so
        ``int4-g128`` on a 576-wide input axis gets groups of 96. Raises when there is none.
        """
        g = self.group_size
        if not g or length % g == 0:
            return self
        for step in (32, 8):
            fits = [d for d in range(step, g, step) if length % d == 0]
            if fits:
                return self.replace(group_size=fits[-1])
        raise ValueError(f"no group size below {g} divides input width {length}; use per-channel scales or "
                         f"a divisor of {length}")


def as_spec(spec: "QuantSpec | str | None") -> "QuantSpec | None":
    """Accepts a spec, a short name (``"int8"``, ``"int4-g128"``, ``"nf4-g64"``), or None."""
    if spec is None or isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        name, sep, group = spec.partition("-g")
        if sep:
            if not group.isdigit() or int(group) <= 0:
                raise ValueError(f"spec name {spec!r}: the group size after '-g' must be a positive integer, "
                                 f"e.g. '{name}-g128'")
            return QuantSpec(format=name, granularity="per_group", group_size=int(group))
        return QuantSpec(format=name)
    raise TypeError(f"expected a QuantSpec or a format name, got {type(spec).__name__}")
