"""Progress on long work: a tqdm bar on a terminal, plain lines otherwise (CI logs, batch jobs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``step(i)`` after each of ``total`` units of work; ``close()`` at the end.

    On a terminal this is a tqdm bar on stderr; when stderr is not a terminal it prints one
    ``[jaxq] desc: unit i/total done, t s`` line per step instead, so logs stay readable.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "block"):
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

    def step(self, i: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"[jaxq] {self.desc}: {self.unit} {i + 1}/{self.total} done, {time.perf_counter() - self.t0:.1f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
