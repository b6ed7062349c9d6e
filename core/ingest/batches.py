"""What one reader hands to the assembler: a table fragment, its rejects and its counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.tables import ITEM_COLUMNS, POSTING_COLUMNS, REJECT_COLUMNS, conform, empty_frame

# Order of records across all posting sources; the assembler breaks duplicate ties with it.
RECORD_SEQ = "record_seq"


@dataclass
class Parsed:
    """Rows of one table parsed from one source, with the records that could not be used."""

    source: str  # the file (or request part) the records came from, as counted in the report
    frame: pd.DataFrame
    rejects: pd.DataFrame
    records_read: int
    unreadable_dates: int = 0  # optional timestamps present but unreadable, left empty


@dataclass
class PostingBatch(Parsed):
    """Posting rows (canonical columns plus ``record_seq``) and the items of those rows.

    ``record_seq`` numbers the records of this batch from 0 in reading order; the assembler
    offsets it so the sequence runs across batches.
    """

    items: pd.DataFrame = field(default_factory=lambda: empty_items())


_EMPTY_TABLES: dict[tuple[tuple[str, str], ...], pd.DataFrame] = {}


def empty_table(columns: dict[str, str]) -> pd.DataFrame:
    """``empty_frame(columns)``, built once per schema and copied (building costs ~5 ms)."""
    key = tuple(columns.items())
    if key not in _EMPTY_TABLES:
        _EMPTY_TABLES[key] = empty_frame(columns)
    return _EMPTY_TABLES[key].copy()


def empty_postings() -> pd.DataFrame:
    return empty_table({**POSTING_COLUMNS, RECORD_SEQ: "int64"})


def empty_items() -> pd.DataFrame:
    return empty_table({**ITEM_COLUMNS, RECORD_SEQ: "int64"})


def build_canonical(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """The canonical columns of ``frame``, in order, cast with ``conform`` where needed.

    Only columns whose dtype differs go through ``conform`` (re-casting a column that is
    already right costs milliseconds, which a one-posting request would pay a dozen times).
    Absent columns are added with their dtype's own missing value: ``conform`` would use
    ``pd.NA``, which a float64 column cannot hold.
    """
    frame = frame.reset_index(drop=True)
    wrong = {
        name: dtype
        for name, dtype in columns.items()
        if name in frame.columns and str(frame[name].dtype) != dtype
    }
    cast = conform(frame[list(wrong)], wrong) if wrong else frame
    return pd.DataFrame(
        {
            name: cast[name]
            if name in wrong
            else frame[name]
            if name in frame.columns
            else pd.Series(index=frame.index, dtype=dtype)
            for name, dtype in columns.items()
        },
        index=frame.index,
    )


def build_rejects(
    file: str, lines: Sequence[int] | np.ndarray, reasons: Sequence[str]
) -> pd.DataFrame:
    """A rejects table for one source file."""
    if len(lines) == 0:
        return empty_table(REJECT_COLUMNS)
    frame = pd.DataFrame({"file": file, "line": list(lines), "reason": list(reasons)})
    return build_canonical(frame, REJECT_COLUMNS)


def concat_frames(frames: Sequence[pd.DataFrame], empty: pd.DataFrame) -> pd.DataFrame:
    """Concatenate fragments of one table, keeping the canonical dtypes when all are empty."""
    nonempty = [f for f in frames if len(f)]
    if not nonempty:
        return empty
    if len(nonempty) == 1:
        return nonempty[0].reset_index(drop=True)
    return pd.concat(nonempty, ignore_index=True)
