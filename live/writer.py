"""One writer thread for the book: what the routes receive is committed before they answer.

A route hands :meth:`BookWriter.submit` an operation (a function of a connection, e.g. a call of
:func:`live.book.accept_push`) and awaits it; the writer thread takes every operation waiting,
runs them in ONE transaction and commits (group commit), then resolves each route's future. A
push is thus on disk before its 200 goes out, and a burst of pushes costs one commit, not one
each. If an operation fails, the batch is rolled back and its operations are run again one per
transaction, so that one bad record fails only its own request; if the database is unreachable,
every waiting request gets that error (the routes answer 503, and Ozon retries).

Each operation returns ``(value, times)``: the record times it stored, from which the writer moves
the book's clock (:func:`live.book.advance_clock`) in the same transaction, never beyond the wall
clock plus ``max_skew_ns`` (a record dated years ahead must not move the book there).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from live.book import advance_clock, read_clock

logger = logging.getLogger(__name__)

Operation = Callable[[Connection], tuple[Any, Sequence[int]]]
_STOP = object()


@dataclass
class _Job:
    operation: Operation
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(job: _Job, value: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value)

    job.loop.call_soon_threadsafe(settle)


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be used at all (rather than this record)."""
    return isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


class BookWriter:
    """Commits operations in batches from one thread; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 512,
        max_skew_ns: int = 3_600 * 10**9,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_skew_ns = max_skew_ns
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="book-writer", daemon=True)
        self.clock: int | None = None  # the book's clock as last committed

    def start(self) -> None:
        with self.engine.connect() as connection:
            self.clock = read_clock(connection)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is waiting, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    async def submit(self, operation: Operation) -> Any:
        """Run ``operation`` in the next committed batch; its value, or what it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(operation, future, loop))
        return await future

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stopping = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)
            if stopping:
                return

    def _commit(self, batch: list[_Job]) -> None:
        try:
            values = self._transaction(batch)
        except Exception as exc:
            if _unreachable(exc) or len(batch) == 1:
                if _unreachable(exc):
                    logger.error("the book is unavailable: %s", type(exc).__name__)
                for job in batch:
                    _resolve(job, None, exc)
                return
            for job in batch:
                self._commit([job])
            return
        for job, value in zip(batch, values, strict=True):
            _resolve(job, value, None)

    def _transaction(self, batch: list[_Job]) -> list[Any]:
        values = []
        latest: int | None = None
        with self.engine.begin() as connection:
            for job in batch:
                value, times = job.operation(connection)
                values.append(value)
                for at in times:
                    if latest is None or at > latest:
                        latest = at
            if latest is not None:
                latest = min(latest, time.time_ns() + self.max_skew_ns)
                if self.clock is None or latest > self.clock:
                    advance_clock(connection, latest)
        if latest is not None and (self.clock is None or latest > self.clock):
            self.clock = latest
        return values
