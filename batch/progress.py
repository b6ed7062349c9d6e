"""Progress of a batch run: a bar on a terminal, plain log lines otherwise, nothing in tests.

A run reports stages (``begin``/``advance``/``end``, or the :meth:`Progress.stage` context).
A stage with a ``total`` counts rows; one without is a step whose length is not known in
advance (loading the history). Implementations decide how to show it; the scoring code never
knows whether a human is watching.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

logger = logging.getLogger(__name__)

# Plain log lines for one stage come at most this often (the first and last always come).
LOG_EVERY_SECONDS = 5.0


class Progress:
    """Receives a run's stages; the base class ignores them."""

    def begin(self, stage: str, total: int | None = None) -> None:
        """A stage starts; ``total`` is its number of rows when known."""

    def advance(self, amount: int) -> None:
        """``amount`` more rows of the current stage are done."""

    def end(self) -> None:
        """The current stage is done."""

    def close(self) -> None:
        """The run is over (success or not)."""

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Progress]:
        self.begin(name, total)
        try:
            yield self
        finally:
            self.end()


class LogProgress(Progress):
    """One log line when a stage starts, every few seconds while it counts rows, and at its end."""

    def __init__(self, log: logging.Logger | None = None, every_seconds: float = LOG_EVERY_SECONDS):
        self._log = log or logger
        if not self._log.isEnabledFor(logging.INFO):
            # Progress lines are what a non-terminal run shows instead of a bar.
            self._log.setLevel(logging.INFO)
        self._every = every_seconds
        self._stage: str | None = None
        self._total: int | None = None
        self._done = 0
        self._started = 0.0
        self._last_line = 0.0

    def begin(self, stage: str, total: int | None = None) -> None:
        self._stage, self._total, self._done = stage, total, 0
        self._started = self._last_line = time.perf_counter()
        if total is None:
            self._log.info("%s ...", stage)
        else:
            self._log.info("%s: %d rows", stage, total)

    def advance(self, amount: int) -> None:
        self._done += amount
        now = time.perf_counter()
        if now - self._last_line >= self._every and self._total:
            self._last_line = now
            self._log.info(
                "%s: %d/%d rows (%.0f %%)",
                self._stage,
                self._done,
                self._total,
                100.0 * self._done / self._total,
            )

    def end(self) -> None:
        if self._stage is None:
            return
        elapsed = time.perf_counter() - self._started
        if self._total is None:
            self._log.info("%s done in %.1f s", self._stage, elapsed)
        else:
            self._log.info("%s: %d rows done in %.1f s", self._stage, self._done, elapsed)
        self._stage = None


class RichProgress(Progress):
    """A rich progress bar per stage on the given terminal stream (stderr by default)."""

    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream or sys.stderr),
            transient=False,
        )
        self._bar.start()
        self._task = None

    def begin(self, stage: str, total: int | None = None) -> None:
        self._task = self._bar.add_task(stage, total=total)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, amount)

    def end(self) -> None:
        if self._task is not None:
            task = next(t for t in self._bar.tasks if t.id == self._task)
            # A step without a row count shows as a full bar once it is done.
            done = task.total if task.total is not None else 1
            self._bar.update(self._task, total=done, completed=done)
            self._task = None

    def close(self) -> None:
        self._bar.stop()


def build_progress(stream: TextIO | None = None) -> Progress:
    """A bar when ``stream`` (stderr by default) is a terminal, log lines otherwise."""
    stream = stream or sys.stderr
    if stream.isatty():
        return RichProgress(stream)
    return LogProgress()
