"""A dependency-free progress bar for long work (replica builds, indexing), drawn on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call with (done, total); redraws at most 10 times a second, only on a terminal unless forced."""

    def __init__(self, label: str, *, unit: str = "", stream: TextIO | None = None, force: bool = False) -> None:
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.start = self._last = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {done}/{total}{self.unit} "
                          f"({rate:,.0f}{self.unit}/s)")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
