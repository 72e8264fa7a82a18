"""How scales tile a tensor: per-tensor, per-channel, and per-group.

A tiling is described by three numbers, all stored with *negative* axes so that
they stay valid when leading axes are mapped over (``vmap``, ``scan``):

* ``channel_axes`` - axes that keep one scale per index (e.g. the output channel);
* ``group_axis`` / ``group_size`` - one axis cut into groups of ``group_size``
  consecutive elements, each with its own scale (per-group / sub-channel);
* every other axis is reduced: it shares its scale.

To compute statistics, a tensor is viewed in *grouped form*: the group axis of
length ``n`` is split into ``(n // g, g)``. Reductions then run over the
``g`` sub-axis and the shared axes with ``keepdims=True``, so the result
broadcasts against the grouped tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Normalised (negative-axis) scale tiling of a tensor of some rank."""

    channel_axes: tuple[int, ...] = ()
    group_axis: int | None = None
    group_size: int | None = None

    @staticmethod
    def make(
        shape: Sequence[int],
        channel_axes: Sequence[int] = (),
        group_axis: int | None = None,
        group_size: int | None = None,
        *,
        where: str = "",
    ) -> "Tiling":
        """Validates axes against ``shape`` and returns a tiling with negative axes.

        Raises:
          ValueError: an axis is out of range, the group axis is also a channel
            axis, or the group size does not divide the axis. The message names
            ``where`` (a parameter path) and the shape.
        """
        ndim = len(shape)
        at = f" for {where}" if where else ""

        def norm(a: int, what: str) -> int:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"{what} {a} is out of range{at} with shape {tuple(shape)} (rank {ndim}); "
                    f"use an axis in [{-ndim}, {ndim - 1}]"
                )
            return a % ndim - ndim

        chans = tuple(sorted({norm(a, "channel axis") for a in channel_axes}))
        if group_size is None:
            return Tiling(chans, None, None)
        if group_axis is None:
            raise ValueError(f"group_size={group_size} needs a group_axis{at}")
        g_axis = norm(group_axis, "group axis")
        if g_axis in chans:
            raise ValueError(
                f"axis {g_axis} cannot be both a channel axis and the group axis{at} "
                f"(shape {tuple(shape)}); drop it from channel_axes"
            )
        n = shape[g_axis]
        if group_size <= 0 or n % group_size:
            divisors = [d for d in range(2, min(n, 256) + 1) if n % d == 0][-5:]
            raise ValueError(
                f"group size {group_size} does not divide axis {g_axis} of length {n}{at} "
                f"with shape {tuple(shape)}; use a divisor of {n} such as {divisors or [n]}, "
                "or per-channel scales"
            )
        return Tiling(chans, g_axis, int(group_size))

    # --- shapes -------------------------------------------------------------------------
    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the stored scale: channel axes kept, groups counted, the rest 1."""
        ndim = len(shape)
        out = []
        for i, n in enumerate(shape):
            neg = i - ndim
            if neg in self.channel_axes:
                out.append(n)
            elif neg == self.group_axis:
                out.append(n // self.group_size)
            else:
                out.append(1)
        return tuple(out)

    def grouped_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(shape)
        if self.group_axis is None:
            return tuple(shape)
        a = self.group_axis % len(shape)
        return tuple(shape[:a] + [shape[a] // self.group_size, self.group_size] + shape[a + 1 :])

    def reduce_axes(self, ndim: int) -> tuple[int, ...]:
        """Axes of the grouped form that share one scale (non-negative)."""
        g = None if self.group_axis is None else self.group_axis % ndim
        axes = []
        j = 0
        for i in range(ndim):
            neg = i - ndim
            if i == g:
                axes.append(j + 1)  # the within-group sub-axis
                j += 2
                continue
            if neg not in self.channel_axes:
                axes.append(j)
            j += 1
        return tuple(axes)

    # --- conversions --------------------------------------------------------------------
    def to_grouped(self, x: jax.Array) -> jax.Array:
        return x.reshape(self.grouped_shape(x.shape))

    def from_grouped(self, xg: jax.Array, shape: Sequence[int]) -> jax.Array:
        return xg.reshape(tuple(shape))

    def scale_to_grouped(self, scale: jax.Array) -> jax.Array:
        """Stored scale -> broadcastable against the grouped form."""
        if self.group_axis is None:
            return scale
        a = self.group_axis % scale.ndim
        return jnp.expand_dims(scale, a + 1)

    def scale_from_grouped(self, scale_g: jax.Array) -> jax.Array:
        """Keep-dims statistic in grouped form -> stored scale shape."""
        if self.group_axis is None:
            return scale_g
        a = self.group_axis % (scale_g.ndim - 1)
        return jnp.squeeze(scale_g, a + 1)

    def broadcast_scale(self, scale: jax.Array, shape: Sequence[int]) -> jax.Array:
        """Stored scale expanded to the full logical ``shape`` (for fused dequantization)."""
        sg = self.scale_to_grouped(scale)
        return jnp.broadcast_to(sg, self.grouped_shape(shape)).reshape(tuple(shape))
