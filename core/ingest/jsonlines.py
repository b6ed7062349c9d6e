"""JSON Lines files (postings, pushes, product cards) -> parsed batches, in parallel when big.

A file is decoded in chunks so memory stays bounded (decoded JSON takes ~10x its text).
Postings are decoded one line at a time just as ``RawPostings`` reads them: each decoded object
is read while it is still in the CPU cache and freed before the next line is decoded, which
makes decoding and reading together much faster than decoding a whole chunk first. A
file larger than ``PARALLEL_MIN_BYTES`` is cut at line boundaries into byte ranges that
worker processes parse on their own; the ranges' line numbers are shifted back into file
lines afterwards, so the result is the same as reading the file in one pass.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from multiprocessing import current_process
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pandas as pd

from core.ingest.batches import Parsed, build_rejects, concat_frames
from core.ingest.events import build_push_events
from core.ingest.postings import build_raw_posting_batch
from core.ingest.products import build_products
from core.ingest.raw_postings import RawPostings

# Lines decoded per step: bounds memory at full vector speed.
CHUNK_LINES = 20_000
# Below this a file is read in-process: starting workers costs more than it saves.
PARALLEL_MIN_BYTES = 256 * 2**20
# Byte ranges per worker: several, so a slow range does not leave the other workers idle.
RANGES_PER_WORKER = 4
# The longest line read: a posting, a push or a card takes kilobytes. A longer line is a broken
# export (or hostile), and reading it whole could take gigabytes once decoded: it is skipped in
# bounded blocks and rejected.
MAX_LINE_BYTES = 16 * 2**20
_SKIP_BLOCK_BYTES = 2**20

BOM = b"\xef\xbb\xbf"

logger = logging.getLogger(__name__)

Builder = Callable[[Sequence[Any], Sequence[int], str], Parsed]
# Builders of kinds that take a decoded list; postings are read as they are decoded.
BUILDERS: dict[str, Builder] = {
    "pushes": build_push_events,
    "products": build_products,
}
KINDS = ("postings", *BUILDERS)


@contextmanager
def paused_garbage_collector() -> Iterator[None]:
    """Pause the cyclic garbage collector while decoding.

    Decoding creates millions of small dicts and lists and no reference cycles; the collector
    would rescan all of them again and again, which makes a large load several times slower.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class LineChunk:
    """Undecoded lines of a chunk with their line numbers, and the lines too long to read."""

    texts: list[bytes]
    lines: list[int]
    unread_lines: list[int]
    unread_reasons: list[str]


class DecodedLines:
    """The JSON values of a chunk's lines, decoded one by one as they are iterated.

    A line that is not JSON is left out and noted with its reason. While iterating,
    ``lines`` grows by the line of each value handed out, so after one full iteration it
    pairs with the values in order.
    """

    def __init__(self, chunk: LineChunk) -> None:
        self.chunk = chunk
        self.lines: list[int] = []
        self.bad_lines: list[int] = []
        self.bad_reasons: list[str] = []

    def __iter__(self) -> Iterator[Any]:
        loads = orjson.loads
        for text, line in zip(self.chunk.texts, self.chunk.lines, strict=True):
            try:
                value = loads(text)
            except orjson.JSONDecodeError as exc:
                self.bad_lines.append(line)
                self.bad_reasons.append(f"not valid JSON ({exc.msg})")
                continue
            self.lines.append(line)
            yield value

    def rejects(self, file: str) -> pd.DataFrame:
        """The chunk's lines that were not read or not JSON, in line order."""
        lines = [*self.chunk.unread_lines, *self.bad_lines]
        reasons = [*self.chunk.unread_reasons, *self.bad_reasons]
        if self.chunk.unread_lines and self.bad_lines:
            order = sorted(range(len(lines)), key=lines.__getitem__)
            lines, reasons = [lines[k] for k in order], [reasons[k] for k in order]
        return build_rejects(file, lines, reasons)


def build_chunk_batch(chunk: LineChunk, kind: str, file: str) -> Parsed:
    """Decode a chunk's lines and build them into a batch of ``kind``, decode rejects included."""
    decoded = DecodedLines(chunk)
    if kind == "postings":
        batch: Parsed = build_raw_posting_batch(RawPostings(decoded), decoded.lines, file)
    else:
        values = list(decoded)
        batch = BUILDERS[kind](values, decoded.lines, file)
    return with_decode_rejects(batch, decoded.rejects(file))


class JsonLinesChunks:
    """Lines of a byte range of a file, in chunks of undecoded lines (``LineChunk``).

    Lines are numbered from 1 at ``start``. Blank lines are skipped without a trace; a line
    longer than ``MAX_LINE_BYTES`` is not read and becomes a reject. A chunk holds at most
    ``chunk_lines`` lines, read and unread together. After iteration ``lines_read`` holds
    the number of physical lines in the range, blank ones included.
    """

    def __init__(
        self, path: Path, start: int = 0, stop: int | None = None, chunk_lines: int = CHUNK_LINES
    ) -> None:
        self.path = path
        self.start = start
        self.stop = stop
        self.chunk_lines = chunk_lines
        self.lines_read = 0

    def __iter__(self) -> Iterator[LineChunk]:
        texts: list[bytes] = []
        lines: list[int] = []
        bad_lines: list[int] = []
        bad_reasons: list[str] = []
        position = self.start
        at_file_start = self.start == 0
        with self.path.open("rb") as handle:
            handle.seek(self.start)
            while self.stop is None or position < self.stop:
                line = handle.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                position += len(line)
                self.lines_read += 1
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    skipped, ended = skip_rest_of_line(handle)
                    position += skipped
                    bad_lines.append(self.lines_read)
                    bad_reasons.append(overlong_line_reason(len(line) + skipped - ended))
                    continue
                if at_file_start:
                    line = line.removeprefix(BOM)
                    at_file_start = False
                # Whitespace alone (bytes.isspace is false for b"", hence the length test).
                if not line or line.isspace():
                    continue
                texts.append(line)
                lines.append(self.lines_read)
                if len(texts) + len(bad_lines) >= self.chunk_lines:
                    yield LineChunk(texts, lines, bad_lines, bad_reasons)
                    texts, lines, bad_lines, bad_reasons = [], [], [], []
        if texts or bad_lines:
            yield LineChunk(texts, lines, bad_lines, bad_reasons)


def skip_rest_of_line(handle: BinaryIO) -> tuple[int, bool]:
    """Move past the end of the current line in bounded blocks.

    Returns the bytes skipped (its newline included) and whether the line ended in a newline
    (rather than at the end of the file).
    """
    skipped = 0
    while True:
        block = handle.readline(_SKIP_BLOCK_BYTES)
        skipped += len(block)
        if not block:
            return skipped, False
        if block.endswith(b"\n"):
            return skipped, True


def overlong_line_reason(length: int) -> str:
    """Why a line of ``length`` bytes (newline not counted) was not read."""
    return (
        f"line is {length:,} bytes long, more than the {MAX_LINE_BYTES // 2**20} MiB "
        "a record may take: not read"
    )


def with_decode_rejects(batch: Parsed, decode_rejects: pd.DataFrame) -> Parsed:
    """Count lines that were not JSON as read and rejected records of the batch."""
    if len(decode_rejects):
        rejects = concat_frames([decode_rejects, batch.rejects], batch.rejects)
        batch.rejects = rejects.sort_values("line", kind="stable", ignore_index=True)
        batch.records_read += len(decode_rejects)
    return batch


def parse_json_lines_range(
    path: Path, kind: str, start: int = 0, stop: int | None = None
) -> tuple[list[Parsed], int]:
    """Parse one byte range with the builder of ``kind``; also its number of lines."""
    if kind not in KINDS:
        raise KeyError(kind)
    chunks = JsonLinesChunks(path, start, stop)
    batches = [build_chunk_batch(chunk, kind, path.name) for chunk in chunks]
    return batches, chunks.lines_read


def _parse_range_in_worker(path: str, kind: str, start: int, stop: int) -> tuple[list[Parsed], int]:
    with paused_garbage_collector():
        return parse_json_lines_range(Path(path), kind, start, stop)


def split_at_line_starts(path: Path, parts: int) -> list[tuple[int, int]]:
    """Byte ranges covering the file, each starting at the beginning of a line."""
    size = path.stat().st_size
    cuts = [0]
    with path.open("rb") as handle:
        for k in range(1, parts):
            handle.seek(size * k // parts)
            skip_rest_of_line(handle)  # finish the line the seek landed in
            cut = handle.tell()
            if cuts[-1] < cut < size:
                cuts.append(cut)
    cuts.append(size)
    return list(pairwise(cuts))


def shift_lines(batch: Parsed, offset: int) -> Parsed:
    """Renumber a range's lines as lines of the whole file."""
    if offset:
        batch.rejects = batch.rejects.assign(line=batch.rejects["line"] + offset)
        if "source_line" in batch.frame.columns:
            batch.frame = batch.frame.assign(source_line=batch.frame["source_line"] + offset)
    return batch


class JsonLinesLoads:
    """JSON Lines files parsed by worker processes in the background, collected when needed.

    ``start`` hands the byte ranges of a file of at least ``parallel_min_bytes`` (default
    ``PARALLEL_MIN_BYTES``) to one shared pool of ``workers`` processes (default: one per CPU)
    and returns at once, so the caller reads its other files meanwhile and the ranges of
    several files (postings, then pushes) keep every worker busy to the end instead of each
    file waiting for the slowest range of the one before. ``batches`` returns a file's
    batches in file order with file line numbers; a smaller file is parsed there and then,
    in this process. Use it as a context manager, which stops the workers.
    """

    def __init__(self, *, workers: int | None = None, parallel_min_bytes: int | None = None):
        self.workers = workers or os.cpu_count() or 1
        self.threshold = PARALLEL_MIN_BYTES if parallel_min_bytes is None else parallel_min_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[tuple[Path, str], list[Future[tuple[list[Parsed], int]]]] = {}

    def __enter__(self) -> JsonLinesLoads:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if self._pool is not None:
            # After an error (a CSV that stops the load) the ranges still running are not
            # waited for: their results would be thrown away.
            self._pool.shutdown(wait=exc_type is None, cancel_futures=True)
            self._pool = None

    def start(self, path: Path, kind: str) -> None:
        """Start parsing ``path`` in the workers when it is large enough to be worth it."""
        # A daemonic process (itself a pool worker) may not start processes of its own.
        if self.workers < 2 or path.stat().st_size < self.threshold or current_process().daemon:
            return
        ranges = split_at_line_starts(path, self.workers * RANGES_PER_WORKER)
        try:
            if self._pool is None:
                # The platform's default start method: fork on Linux, which needs no
                # re-import of the caller's __main__ (a script without a main guard cannot
                # be spawned from).
                self._pool = ProcessPoolExecutor(max_workers=self.workers)
            self._pending[(path, kind)] = [
                self._pool.submit(_parse_range_in_worker, str(path), kind, start, stop)
                for start, stop in ranges
            ]
        except BrokenProcessPool:
            pass  # ``batches`` reads the file in this process

    def batches(self, path: Path, kind: str) -> list[Parsed]:
        """The batches of ``path``: from the workers if started there, else parsed here."""
        futures = self._pending.pop((path, kind), None)
        if futures is None:
            return parse_json_lines_range(path, kind)[0]
        try:
            results = [future.result() for future in futures]
        except BrokenProcessPool:
            logger.warning("worker processes failed on %s; reading it in this process", path.name)
            return parse_json_lines_range(path, kind)[0]
        batches: list[Parsed] = []
        offset = 0
        for range_batches, lines_read in results:
            batches += [shift_lines(batch, offset) for batch in range_batches]
            offset += lines_read
        return batches


def load_json_lines_batches(
    path: Path,
    kind: str,
    *,
    workers: int | None = None,
    parallel_min_bytes: int | None = None,
    loads: JsonLinesLoads | None = None,
) -> list[Parsed]:
    """Parse a JSON Lines file of ``kind`` ("postings", "pushes", "products") into batches.

    Files of at least ``parallel_min_bytes`` (default ``PARALLEL_MIN_BYTES``) are split across
    ``workers`` processes (default: one per CPU); the batches come back in file order with
    file line numbers. With ``loads``, the file is taken from (or parsed through) those
    background loads, which may have started on it already.
    """
    if loads is not None:
        return loads.batches(path, kind)
    with JsonLinesLoads(workers=workers, parallel_min_bytes=parallel_min_bytes) as own:
        own.start(path, kind)
        return own.batches(path, kind)
