"""A one-line progress bar on a terminal: rewritten in place with a carriage return, silent elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Progress of one run: ``label [#####.....] step/total  elapsed s  extra``.

    Writes only when ``enabled`` (default: ``stream`` is a terminal), at most every ``interval_s`` seconds and
    at the last step, so a redirected log or a CI job gets none of it. ``close`` clears the line.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval_s: float = 0.2,
        width: int = 24,
    ) -> None:
        self.label, self.total, self.width, self.interval_s = label, max(total, 1), width, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._start = time.perf_counter()
        self._last = -float("inf")
        self._shown = 0

    def update(self, done: int, extra: str = "") -> None:
        """Show ``done`` of ``total`` steps; ``extra`` is appended (e.g. the last accuracy)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < self.interval_s and done < self.total:
            return
        self._last = now
        filled = self.width * min(done, self.total) // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {done}/{self.total}  {now - self._start:6.1f} s  {extra}".rstrip()
        self.stream.write("\r" + line.ljust(self._shown))
        self.stream.flush()
        self._shown = len(line)

    def close(self) -> None:
        """Erase the line, so what is printed next starts at the margin."""
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0
