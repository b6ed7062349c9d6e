"""JSON Lines files (postings, pushes, product cards) -> parsed batches, in parallel when big.

A file is decoded in chunks so memory stays bounded (decoded JSON takes ~10x its text). A
file larger than ``PARALLEL_MIN_BYTES`` is cut at line boundaries into byte ranges that
worker processes parse on their own; the ranges' line numbers are shifted back into file
lines afterwards, so the result is the same as reading the file in one pass.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import pairwise
from multiprocessing import current_process
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pandas as pd

from training.ingest.batches import Parsed, build_rejects, concat_frames
from training.ingest.events import build_push_events
from training.ingest.postings import build_api_posting_batch
from training.ingest.products import build_products

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
BUILDERS: dict[str, Builder] = {
    "postings": build_api_posting_batch,
    "pushes": build_push_events,
    "products": build_products,
}


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


class JsonLinesChunks:
    """Decoded lines of a byte range of a file, in chunks of values, lines and rejects.

    Lines are numbered from 1 at ``start``. Blank lines are skipped without a trace; a line
    that is not JSON, or longer than ``MAX_LINE_BYTES``, becomes a reject. After iteration
    ``lines_read`` holds the number of physical lines in the range, blank ones included.
    """

    def __init__(
        self, path: Path, start: int = 0, stop: int | None = None, chunk_lines: int = CHUNK_LINES
    ) -> None:
        self.path = path
        self.start = start
        self.stop = stop
        self.chunk_lines = chunk_lines
        self.lines_read = 0

    def __iter__(self) -> Iterator[tuple[list[Any], list[int], pd.DataFrame]]:
        values: list[Any] = []
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
                if not line.strip():
                    continue
                try:
                    values.append(orjson.loads(line))
                    lines.append(self.lines_read)
                except orjson.JSONDecodeError as exc:
                    bad_lines.append(self.lines_read)
                    bad_reasons.append(f"not valid JSON ({exc.msg})")
                if len(values) + len(bad_lines) >= self.chunk_lines:
                    yield values, lines, build_rejects(self.path.name, bad_lines, bad_reasons)
                    values, lines, bad_lines, bad_reasons = [], [], [], []
        if values or bad_lines:
            yield values, lines, build_rejects(self.path.name, bad_lines, bad_reasons)


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
    build = BUILDERS[kind]
    chunks = JsonLinesChunks(path, start, stop)
    batches = [
        with_decode_rejects(build(values, lines, path.name), decode_rejects)
        for values, lines, decode_rejects in chunks
    ]
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


def load_json_lines_batches(
    path: Path,
    kind: str,
    *,
    workers: int | None = None,
    parallel_min_bytes: int | None = None,
) -> list[Parsed]:
    """Parse a JSON Lines file of ``kind`` ("postings", "pushes", "products") into batches.

    Files of at least ``parallel_min_bytes`` (default ``PARALLEL_MIN_BYTES``) are split across
    ``workers`` processes (default: one per CPU); the batches come back in file order with
    file line numbers.
    """
    workers = workers or os.cpu_count() or 1
    threshold = PARALLEL_MIN_BYTES if parallel_min_bytes is None else parallel_min_bytes
    # A daemonic process (itself a pool worker) may not start processes of its own.
    if workers < 2 or path.stat().st_size < threshold or current_process().daemon:
        return parse_json_lines_range(path, kind)[0]
    ranges = split_at_line_starts(path, workers * RANGES_PER_WORKER)
    try:
        # The platform's default start method: fork on Linux, which needs no re-import of
        # the caller's __main__ (a script without a main guard cannot be spawned from).
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(_parse_range_in_worker, str(path), kind, start, stop)
                for start, stop in ranges
            ]
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
