"""How far a study is: jobs done of each batch and an estimate of the time left.

A study runs in batches (baseline grids, meta-training, selection, held-out runs) whose
sizes depend on what earlier batches found, so progress is counted per batch. The
estimate is the batch's elapsed time per finished job times the jobs left, which holds
whatever the number of workers is.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

__all__ = ["Progress", "TerminalProgress", "format_duration"]


class Progress:
    """What a study reports as it runs; this base class shows nothing."""

    def start(self, what: str, total: int) -> None:
        """A batch of ``total`` jobs (those not cached) begins."""

    def done(self, job: Any) -> None:
        """One job of the batch ended (finished or failed)."""

    def finish(self) -> None:
        """The batch ended."""


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"2 h 05 min"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class TerminalProgress(Progress):
    """One line on ``stream`` (standard error), rewritten in place; nothing when it is not a terminal.

    Args:
        stream: Where to write (default: ``sys.stderr`` at the time of writing).
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self.what, self.total, self.count, self._started = "", 0, 0, 0.0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def live(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def start(self, what: str, total: int) -> None:
        self.what, self.total, self.count, self._started = what, total, 0, self._clock()
        self._draw()

    def done(self, job: Any) -> None:
        self.count += 1
        self._draw()

    def finish(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def line(self) -> str:
        """The text of the line as it stands."""
        if self.count == 0:
            left = "estimating the time left"
        else:
            per_job = (self._clock() - self._started) / self.count
            left = f"about {format_duration(per_job * (self.total - self.count))} left"
        return f"  {self.what}: {self.count}/{self.total} jobs done, {left}"

    def _draw(self) -> None:
        if self.live:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
