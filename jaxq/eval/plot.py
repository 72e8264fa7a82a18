"""The report's figure: accuracy against bits per weight and against model size."""

from __future__ import annotations

import os
from typing import Sequence

from jaxq.eval.report import StrategyResult

__all__ = ["plot_results"]


def _stored_bits(r: StrategyResult) -> float:
    """Where a row sits on the bits axis: its stored bits per weight (scales included) when the run
    measured them, else its format's nominal bits (the float baseline)."""
    return float((r.extra or {}).get("bits_per_weight", r.bits))


def plot_results(
    rows: Sequence[StrategyResult], path: str | os.PathLike[str], title: str = "", baseline: StrategyResult | None = None
) -> None:
    """Saves a PNG with two panels: accuracy vs weight bits, accuracy vs model bytes.

    Uses matplotlib's non-interactive Agg backend (no display needed). PTQ and
    QAT points get different markers; every point is labelled with its strategy;
    a dashed line marks the float baseline's accuracy. Every quantized point sits at
    its stored bits per weight (``extra["bits_per_weight"]``, scales included), so
    uniform and automatically allocated strategies compare on one axis.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    markers = {"float": "*", "ptq": "o", "qat": "s"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key, xlabel in (
        (axes[0], "bits", "stored bits per weight (scales included)"),
        (axes[1], "kib", "model size (KiB)"),
    ):
        for r in rows:
            x = _stored_bits(r) if key == "bits" else r.nbytes / 1024
            ax.scatter([x], [100 * r.accuracy], marker=markers.get(r.method, "o"), s=60,
                       label=r.method, zorder=3)
            ax.annotate(r.name, (x, 100 * r.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if baseline is not None:
            ax.axhline(100 * baseline.accuracy, ls="--", lw=1, color="gray", label="float accuracy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    # Ticks at the formats' whole bit widths: stored values (4.04, 4.5, ...) sit just right of them
    # and would crowd the axis if each had its own tick.
    axes[0].set_xticks(sorted({max(1, int(round(r.bits))) for r in rows}))
    for ax in axes:
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    if title:
        fig.suptitle(title)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
