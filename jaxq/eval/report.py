"""The report of a run: one row per strategy, as a terminal table and as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Sequence

__all__ = ["Report", "StrategyResult", "format_bytes", "format_table", "write_json"]


@dataclasses.dataclass(frozen=True)
class StrategyResult:
    """What one strategy gave on the test set.

    Attributes:
      name: the strategy's label.
      precision_name: weight format (``fp32``, ``bf16``, ``int8``, ...).
      bits: bits per weight element.
      activations: ``float`` or ``int8``.
      method: ``ptq``, ``qat``, or ``float`` for the unquantized baseline.
      accuracy, precision, recall, f1: test metrics, fractions in ``[0, 1]``
        (precision/recall/F1 are macro averages over the classes).
      nbytes: storage bytes of the served parameter tree (``jaxq.tree_nbytes``).
      compression: float bytes / ``nbytes``.
      latency_ms: median wall time of one jitted forward pass on one eval batch.
      latency_batch: the batch size of that pass.
      quantize_s: seconds spent calibrating, fine-tuning and quantizing.
      extra: anything else worth keeping (e.g. QAT losses).
    """

    name: str
    precision_name: str
    bits: int
    activations: str
    method: str
    accuracy: float
    precision: float
    recall: float
    f1: float
    nbytes: int
    compression: float
    latency_ms: float
    latency_batch: int
    quantize_s: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Report:
    """A whole run: the float baseline, the strategies, and the context.

    Attributes:
      recipe: the recipe as a plain dict.
      baseline: the float model's row.
      results: one row per strategy, in recipe order.
      info: dataset sizes, timings, versions, device.
    """

    recipe: dict[str, Any]
    baseline: StrategyResult
    results: tuple[StrategyResult, ...]
    info: dict[str, Any]

    def rows(self) -> list[StrategyResult]:
        """The baseline (unless a strategy reproduces it) followed by the strategies."""
        if any(r.method == "float" for r in self.results):
            return list(self.results)
        return [self.baseline, *self.results]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "baseline": self.baseline.to_dict(),
            "results": [r.to_dict() for r in self.results],
            "info": self.info,
        }


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.18 MiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


COLUMNS = ("strategy", "bits", "acts", "method", "acc %", "Δacc", "prec %", "rec %", "F1 %",
           "size", "ratio", "ms/batch", "× float")


def format_table(rows: Sequence[StrategyResult], baseline: StrategyResult, title: str = "") -> str:
    """A fixed-width table: one line per row, accuracy deltas and latency ratios vs ``baseline``."""
    body = []
    for r in rows:
        body.append((
            r.name, str(r.bits), r.activations, r.method,
            f"{100 * r.accuracy:.2f}", f"{100 * (r.accuracy - baseline.accuracy):+.2f}",
            f"{100 * r.precision:.2f}", f"{100 * r.recall:.2f}", f"{100 * r.f1:.2f}",
            format_bytes(r.nbytes), f"{r.compression:.2f}x",
            f"{r.latency_ms:.3f}", f"{r.latency_ms / baseline.latency_ms:.2f}" if baseline.latency_ms else "-",
        ))
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLUMNS)]
    left = {0, 2, 3}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(COLUMNS))
    out = [title] if title else []
    out += [line(COLUMNS), rule, *(line(b) for b in body)]
    return "\n".join(out)


def write_json(path: str | os.PathLike[str], report: Report | dict[str, Any]) -> None:
    """Writes the report as indented JSON, atomically (temporary file, then rename)."""
    data = report.to_dict() if isinstance(report, Report) else report
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
