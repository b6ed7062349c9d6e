"""Safe output files: complete or absent, the same bytes for the same inputs.

Every file of a run is written to a hidden temporary file in its final directory
(``.<name>.<pid>.<random>.tmp``), flushed and fsynced, and only then renamed over the final
name, the scores file last; the directory is fsynced after the renames. A run that fails, runs
out of disk or is interrupted removes its temporary files; one killed outright (SIGKILL, power
loss) leaves at most a hidden temporary file, never a partial output, and the next run over the
same output removes temporaries whose process is gone. An existing output is only ever
replaced by a complete one.

Determinism: Parquet is written with a fixed schema (no pandas metadata), fixed compression
and one row group per scoring chunk; CSV with fixed formatting. Nothing about the run (time,
host, path) goes into the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SCORE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
PARQUET_COMPRESSION = "zstd"
# CSV opens in spreadsheet programs (Excel, WPS): a BOM makes them read UTF-8 Chinese and
# Russian text correctly, as in Ozon's own exports.
CSV_ENCODING = "utf-8-sig"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


class OutputError(Exception):
    """The output cannot be written (bad name, no space, no permission); nothing was left."""


@dataclass(frozen=True)
class OutputPaths:
    """The files of one run: the scores, and the rejects and the summary beside them."""

    scores: Path
    rejects: Path
    summary: Path

    @property
    def format(self) -> str:
        return SCORE_FORMATS[self.scores.suffix.lower()]


def build_output_paths(out: str | Path) -> OutputPaths:
    """``scores.parquet`` -> ``scores.rejects.csv`` and ``scores.summary.json`` beside it."""
    out = Path(out)
    if out.suffix.lower() not in SCORE_FORMATS:
        raise OutputError(
            f"--out {out}: the file name must end in .parquet or .csv (the format follows it)"
        )
    stem = out.name[: -len(out.suffix)]
    return OutputPaths(
        scores=out,
        rejects=out.with_name(f"{stem}.rejects.csv"),
        summary=out.with_name(f"{stem}.summary.json"),
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(paths: Iterable[Path]) -> list[Path]:
    """Delete temporaries of ``paths`` left by runs that are no longer alive; returns them."""
    removed = []
    for final in paths:
        directory = final.parent
        if not directory.is_dir():
            continue
        for candidate in directory.glob(f".{final.name}.*.tmp"):
            match = _TEMP_NAME.match(candidate.name)
            if match is None or match["name"] != final.name:
                continue
            if _pid_alive(int(match["pid"])) and int(match["pid"]) != os.getpid():
                continue
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
                logger.warning("removed %s left by an interrupted run", candidate)
    return removed


_STAGED_DIR_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.(?P<label>tmp|old)$")


def recover_staged_directory(out: Path) -> None:
    """Clean up after a run over the directory ``out`` whose process died mid-way.

    Such a run leaves ``.<name>.<pid>.<random>.tmp`` (a staging directory, incomplete) and,
    if it died between its two renames, ``.<name>.<pid>.<random>.old`` (the previous complete
    output, moved aside): the staging directory is deleted, the previous output put back when
    ``out`` is missing and deleted otherwise.
    """
    if not out.parent.is_dir():
        return
    for candidate in sorted(out.parent.glob(f".{out.name}.*")):
        match = _STAGED_DIR_NAME.match(candidate.name)
        if match is None or match["name"] != out.name or _pid_alive(int(match["pid"])):
            continue
        if match["label"] == "old" and not out.exists():
            candidate.rename(out)
            logger.warning("restored %s from %s left by an interrupted run", out, candidate)
        else:
            shutil.rmtree(candidate, ignore_errors=True)
            logger.warning("removed %s left by an interrupted run", candidate)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFiles:
    """Temporary files that become their final names together, or disappear.

    Use as a context manager: files are staged with :meth:`stage`, written, and renamed by
    :meth:`commit` in staging order; leaving the block without committing (an exception, an
    interrupt) removes every temporary.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._committed = False

    def stage(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._staged.append((temporary, final))
        return temporary

    def commit(self) -> None:
        for temporary, _ in self._staged:
            _fsync_path(temporary)
        for temporary, final in self._staged:
            os.replace(temporary, final)
        for directory in dict.fromkeys(final.parent for _, final in self._staged):
            _fsync_path(directory)
        self._committed = True

    def discard(self) -> None:
        for temporary, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._committed:
            self.discard()


class ScoreWriter:
    """Appends score chunks (Arrow tables of one schema) to a Parquet or CSV file."""

    def __init__(self, path: Path, schema: pa.Schema, file_format: str):
        self.path = path
        self.schema = schema
        self.format = file_format
        self._parquet: pq.ParquetWriter | None = None
        self._csv: IO[str] | None = None
        self._rows = 0
        if file_format == "parquet":
            self._parquet = pq.ParquetWriter(
                path, schema, compression=PARQUET_COMPRESSION, write_statistics=True
            )
        elif file_format == "csv":
            self._csv = path.open("w", encoding=CSV_ENCODING, newline="")
        else:
            raise ValueError(f"unknown score format {file_format!r}")

    def write(self, chunk: pa.Table) -> None:
        if self._parquet is not None:
            self._parquet.write_table(chunk)
        elif self._csv is not None:
            build_csv_frame(chunk).to_csv(
                self._csv, index=False, header=self._rows == 0, lineterminator="\n"
            )
        self._rows += chunk.num_rows

    def close(self) -> None:
        """Finish the file; a file that got no rows still gets its schema (or header)."""
        if self._parquet is not None:
            if self._rows == 0:
                self._parquet.write_table(self.schema.empty_table())
            self._parquet.close()
            self._parquet = None
        if self._csv is not None:
            if self._rows == 0:
                build_csv_frame(self.schema.empty_table()).to_csv(
                    self._csv, index=False, lineterminator="\n"
                )
            self._csv.close()
            self._csv = None

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def build_csv_frame(table: pa.Table) -> pd.DataFrame:
    """A chunk as a frame for CSV: timestamps in ISO-8601 with ``Z``, everything else as is."""
    frame = table.to_pandas()
    for column, arrow_type in zip(table.column_names, table.schema.types, strict=True):
        if pa.types.is_timestamp(arrow_type):
            stamps = frame[column].dt.tz_convert("UTC")
            text = stamps.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").str.replace(".000000Z", "Z")
            frame[column] = text
    return frame


def write_rejects(path: Path, rejects: pd.DataFrame) -> None:
    """The rejected records (``file, line, reason``) in file and line order, as CSV."""
    ordered = rejects.sort_values(["file", "line", "reason"], kind="stable", na_position="last")
    ordered.to_csv(path, index=False, encoding=CSV_ENCODING, lineterminator="\n")


def write_json(path: Path, data: Any) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
