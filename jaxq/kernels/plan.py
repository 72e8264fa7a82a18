"""From a block config and the problem shape to a legal tiling ("plan").

The table gives preferred tile sizes; this module shrinks them to the problem,
rounds them to what the target can lower, and decides how K is walked:

* ``kstep``: the K depth of one dot (logical elements, before int4 packing);
* ``g_steps``: dots per scale group (per-channel scales: all dots of a K slice
  form one "group", so the whole K is accumulated in int32 before scaling);
* GPU: ``split`` K slices run as separate programs (summed by the wrapper);
* TPU: ``sub`` dots per grid step (a K grid step of ``bk = sub * kstep``).

Legality rules (from the Pallas docs and lowering sources): Triton loads need
power-of-two shapes and dots need every dimension >= 16 (int8 dots with K = 16
have failed on GPU, so int8 dots get >= 32); Mosaic TPU blocks need their last
two dimensions divisible by (8, 128) unless they span the array, with 32 rows
preferred for int8 and 16 for bf16 operands.
"""

from __future__ import annotations

import dataclasses
import math

from jaxq.kernels.block_tables import BlockConfig, sm_count
from jaxq.kernels.common import cdiv, is_pow2, next_pow2, round_up


@dataclasses.dataclass(frozen=True)
class Plan:
    """A concrete tiling; every padded size is a whole number of blocks."""

    target: str
    bm: int
    bn: int
    kstep: int  # K depth of one dot (logical)
    g_steps: int  # dots per scale group (per K slice for per-channel scales)
    mp: int  # padded M
    np_: int  # padded N
    kp: int  # padded K (logical)
    gp: int  # padded number of scale rows (1 for per-channel)
    grouped: bool
    split: int = 1  # GPU: K slices
    sub: int = 1  # TPU: dots per grid step
    num_warps: int = 4
    num_stages: int = 3

    @property
    def bk(self) -> int:
        """K depth of one TPU grid step."""
        return self.sub * self.kstep


def _sublanes(x_itemsize: int) -> int:
    return {1: 32, 2: 16}.get(x_itemsize, 8)


def _largest_divisor_multiple(g: int, unit: int, cap: int) -> int | None:
    """Largest multiple of ``unit`` that divides ``g`` and is <= cap."""
    best = None
    d = unit
    while d <= min(g, cap):
        if g % d == 0:
            best = d
        d += unit
    return best


def make_plan(
    m: int,
    k: int,
    n: int,
    n_scale_rows: int,
    *,
    packed: bool,
    int_dot: bool,
    x_itemsize: int,
    config: BlockConfig,
    target: str,
    device_kind: str | None = None,
) -> Plan:
    """Fits ``config`` to an (M, K) x (K, N) problem with ``n_scale_rows`` scale rows.

    ``n_scale_rows`` is 1 for per-channel scales, else K // group_size.
    """
    if k % n_scale_rows:
        raise ValueError(f"{n_scale_rows} scale rows do not divide K={k}")
    grouped = n_scale_rows > 1
    g = k // n_scale_rows if grouped else None
    if packed and (k % 2 or (g is not None and g % 2)):
        raise ValueError(f"int4 weights need an even K and group size, got K={k}, group={g}")
    if target == "gpu":
        return _gpu_plan(m, k, n, g, packed, int_dot, config, device_kind)
    return _tpu_plan(m, k, n, g, packed, x_itemsize, config)


def _gpu_plan(m, k, n, g, packed, int_dot, cfg: BlockConfig, device_kind) -> Plan:
    for name in ("bm", "bn", "bk"):
        if not is_pow2(getattr(cfg, name)):
            raise ValueError(f"Triton blocks must be powers of two, got {name}={getattr(cfg, name)}")
    bm = max(16, min(cfg.bm, next_pow2(m)))
    bn = max(16, min(cfg.bn, next_pow2(n)))
    # Each dot has depth kstep (kstep / 2 per half for int4): >= 16, >= 32 for int8.
    kmin = (32 if int_dot else 16) * (2 if packed else 1)
    bk = max(kmin, min(cfg.bk, next_pow2(k)))
    mp, np_ = round_up(m, bm), round_up(n, bn)
    programs = (mp // bm) * (np_ // bn)
    split = cfg.split_k
    if split == 0:  # enough programs for two waves over the SMs
        split = min(16, next_pow2(cdiv(2 * sm_count(device_kind), programs)))
    if g is not None:
        kstep = bk if g % bk == 0 else g
        g_steps = g // kstep
        n_groups = k // g
        split = max(1, min(split, n_groups))
        gp = round_up(n_groups, split)
        kp = gp * g
    else:
        kstep = bk
        steps = cdiv(k, kstep)
        split = max(1, min(split, steps))
        g_steps = cdiv(steps, split)  # one "group" per K slice
        kp = g_steps * split * kstep
        gp = 1
    return Plan("gpu", bm, bn, kstep, g_steps, mp, np_, kp, gp, g is not None, split=split,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _tpu_plan(m, k, n, g, packed, x_itemsize, cfg: BlockConfig) -> Plan:
    rows = _sublanes(x_itemsize)
    bm = max(rows, min(round_up(cfg.bm, rows), round_up(m, rows)))
    bn = max(128, min(round_up(cfg.bn, 128), round_up(n, 128)))
    # The x block's last (lane) dim is bk, or bk / 2 for int4 halves: a multiple of 128.
    unit = 256 if packed else 128
    cap = max(unit, cfg.bk // unit * unit)
    if g is None:
        kstep = min(cap, round_up(k, unit))
        kp = round_up(k, kstep)
        return Plan("tpu", bm, bn, kstep, kp // kstep, round_up(m, bm), round_up(n, bn), kp, 1, False)
    d = _largest_divisor_multiple(g, unit, cap) if g >= cap else None
    if d is not None:  # big groups: several grid steps per group
        return Plan("tpu", bm, bn, d, g // d, round_up(m, bm), round_up(n, bn), k, k // g, True)
    # Small groups: one grid step holds `sub` whole groups, one dot each.
    base = g * unit // math.gcd(g, unit)
    bk = base * max(1, cap // base)
    kp = round_up(k, bk)
    return Plan("tpu", bm, bn, g, 1, round_up(m, bm), round_up(n, bn), kp, kp // g, True, sub=bk // g)
