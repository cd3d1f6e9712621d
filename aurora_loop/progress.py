"""A plain progress bar for the command-line tools (``forecast``, ``stats``)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A one-line bar on a terminal; off one (a log file), a line per update, or with
    ``every_tenth`` only when another tenth of the way is done (``stream``: stderr)."""

    def __init__(self, total: int, label: str, unit: str = "items", stream: TextIO | None = None,
                 every_tenth: bool = False) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_tenth = every_tenth
        self.tenths = -1

    def update(self, done: int) -> None:
        tenths = 10 * done // max(self.total, 1)
        if self.every_tenth and not self.tty and tenths == self.tenths:
            return
        self.tenths = tenths
        elapsed = time.perf_counter() - self.start
        filled = int(30 * done / max(self.total, 1))
        line = f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {self.unit}  {elapsed:.1f}s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
