"""The live order book written back as a history directory, in the data contract's formats.

Training and the nightly batch (``cancel-risk score --history DIR``) read what the live mode
collected from this directory::

    cancel-risk archive --db sqlite:///book.db --out data/live/history

- ``postings.jsonl``: the posting objects the book holds (the ones the ingestion's merge lets
  win), by posting number;
- ``pushes.jsonl``: every push kept, in the order received, each with its ``received_at`` (the
  book adds it), so a push without a time of its own is dated as the book dated it;
- ``prices.csv`` (``offer_id,at,price,old_price,currency_code``) and ``tracking.csv``
  (``posting_number,at,status,location``): the rows in the order received, each value as the
  row holds it (a number written as Python writes it), empty when the row lacks it. Keys
  outside the contract's columns are not written.

The book holds no product cards, so no ``products.jsonl`` is written (its features stay empty
unless one is added beside the archive).

The four tables are read in one read transaction (one snapshot of the book, even while the
service writes) into files in a temporary directory beside ``out``, each flushed to disk, and
the directory is then renamed into place: a reader sees the previous archive or the new one,
never a half-written one, and a failed run leaves nothing behind. An existing non-empty
``out`` is refused unless ``force`` is given; then it is replaced as a whole (moved aside,
the new one renamed in, the old one deleted). A directory holding subdirectories is not an
archive and is never replaced.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url

from core.ingest.events import PRICE_COLUMNS, SCAN_COLUMNS
from core.ingest.history import POSTINGS_JSONL, PRICES_CSV, PUSHES_JSONL, TRACKING_CSV
from live import schema
from live.book import OrderBook, iter_records, normalise_url, redacted

logger = logging.getLogger(__name__)

ARCHIVE_FILES = (POSTINGS_JSONL, PUSHES_JSONL, PRICES_CSV, TRACKING_CSV)


class ArchiveError(Exception):
    """The archive cannot be written where asked (the message says why); nothing was written."""


@dataclass(frozen=True)
class ArchiveReport:
    """What :func:`write_archive` wrote."""

    out: Path
    postings: int
    pushes: int
    prices: int
    scans: int
    replaced: bool  # an existing archive was replaced (force)

    def format(self) -> str:
        verb = "replaced" if self.replaced else "wrote"
        return (
            f"{verb} {self.out}: {self.postings} postings, {self.pushes} pushes, "
            f"{self.prices} price rows, {self.scans} scans"
        )


def archive_book(url: str, out: str | Path, *, force: bool = False) -> ArchiveReport:
    """Open the book at ``url`` and write it to ``out`` (see :func:`write_archive`).

    A SQLite URL naming a file that does not exist is refused (opening it would create an empty
    book and archive nothing).
    """
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:":
            raise ArchiveError(f"{redacted(url)} is not a book on disk")
        if not Path(database).expanduser().is_file():
            raise ArchiveError(f"no book at {Path(database).expanduser()}")
    book = OrderBook(url)
    try:
        return write_archive(book.engine, out, force=force)
    finally:
        book.close()


def write_archive(engine: Engine, out: str | Path, *, force: bool = False) -> ArchiveReport:
    """Write the book behind ``engine`` as a history directory at ``out``, atomically."""
    out = Path(out).expanduser().absolute()
    existing = _check_target(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _read_snapshot(engine) as connection:
            counts = _write_files(connection, staging)
        _fsync_directory(staging)
        _move_into_place(staging, out, replace=existing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report = ArchiveReport(out, *counts, replaced=existing)
    logger.info("%s", report.format())
    return report


def _check_target(out: Path, *, force: bool) -> bool:
    """Whether ``out`` holds an archive to replace; raises when it may not be written."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ArchiveError(f"{out} exists and is not a directory")
    entries = list(out.iterdir())
    if not entries:
        return False
    if not force:
        raise ArchiveError(
            f"{out} is not empty ({len(entries)} entries); give --force to replace it"
        )
    folders = sorted(e.name for e in entries if e.is_dir() and not e.is_symlink())
    if folders:
        raise ArchiveError(
            f"{out} holds directories ({', '.join(folders[:3])}), so it is not an archive: "
            "not replaced, even with --force"
        )
    return True


@contextlib.contextmanager
def _read_snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one state of the book."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execution_options(isolation_level="REPEATABLE READ")
        # On SQLite the book's connections begin a real transaction at the first read
        # (live.book._sqlite_begin): every file is read from one state of the book.
        try:
            yield connection
        finally:
            connection.rollback()


def _write_files(connection: Connection, directory: Path) -> tuple[int, int, int, int]:
    postings = _write_json_lines(
        directory / POSTINGS_JSONL, iter_records(connection, schema.postings)
    )
    pushes = _write_json_lines(directory / PUSHES_JSONL, iter_records(connection, schema.pushes))
    prices = _write_csv(
        directory / PRICES_CSV, PRICE_COLUMNS, iter_records(connection, schema.prices)
    )
    scans = _write_csv(
        directory / TRACKING_CSV, SCAN_COLUMNS, iter_records(connection, schema.scans)
    )
    return postings, pushes, prices, scans


def _write_json_lines(path: Path, records: Iterator[dict[str, Any]]) -> int:
    count = 0
    with path.open("wb") as handle:
        for record in records:
            handle.write(orjson.dumps(record))
            handle.write(b"\n")
            count += 1
        _flush(handle)
    return count


def csv_cell(value: Any) -> str:
    """A row's value as the CSV holds it: text as it is, a number as Python writes it (the
    shortest form that reads back equal), ``true``/``false``, empty for None."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value).decode()


def _write_csv(path: Path, columns: Sequence[str], rows: Iterator[dict[str, Any]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_cell(row.get(column)) for column in columns])
            count += 1
        _flush(handle)
    return count


def _flush(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _move_into_place(staging: Path, out: Path, *, replace: bool) -> None:
    if not replace:
        # rename(2) also replaces an empty directory, atomically.
        os.replace(staging, out)
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, aside)  # aside is empty: the old archive takes its place
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_directory(out.parent)
