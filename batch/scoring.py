"""Score one shop's open postings: the pandas code both the single-machine and the Spark job run.

The features of every posting open at ``as_of`` come from one call of the one feature function
(:func:`core.features.build_features`, with the aggregates the model learned in training):
a float frame of about 0.3 GB per million postings, small beside the history tables it reads.
Probabilities, risk levels, reasons, actions and decisions are then computed in chunks of
``chunk_rows`` postings (:mod:`batch.chunk`), in this process or in worker processes
(:mod:`batch.parallel`), so what the explanations hold in memory is bounded by the
chunk, whatever the size of the export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa

from batch.chunk import ScoreTally, ScoringOptions, build_score_chunk
from batch.parallel import WorkerPool
from batch.progress import Progress

if TYPE_CHECKING:
    from batch.models import ScoringModel
    from core.tables import HistoryTables

logger = logging.getLogger(__name__)

FUTURE_TOLERANCE = pd.Timedelta(days=1)


class AsOfError(ValueError):
    """No scoring moment can be taken from the export (none at all, or one in the future)."""


def resolve_as_of(
    tables: HistoryTables,
    as_of: pd.Timestamp | str | None,
    *,
    now: pd.Timestamp | None = None,
) -> pd.Timestamp:
    """The scoring moment in UTC, to the microsecond: ``as_of`` or the export's latest event.

    The latest event stands for the export moment only if it is not in the future (``now``,
    the clock by default, plus a day of clock skew): one record with a wrong year would
    otherwise move the whole run to that year. Then ``--as-of`` must be given.
    """
    if as_of is None:
        latest = tables.latest_event_at()
        if latest is None:
            raise AsOfError("the history holds no timestamp: there is nothing to score")
        moment = _utc(pd.Timestamp(latest))
        now = _utc(now if now is not None else pd.Timestamp.now(tz="UTC"))
        if moment > now + FUTURE_TOLERANCE:
            raise AsOfError(
                f"the latest timestamp in the history, {moment.isoformat()}, is in the future "
                f"({describe_future_records(tables, now + FUTURE_TOLERANCE)}): "
                "a record carries a wrong date; give the export moment with --as-of"
            )
    else:
        moment = _utc(pd.Timestamp(as_of))
    # Microseconds are what Parquet and Spark keep; features are computed at the same moment.
    return moment.floor("us").as_unit("ns")


# Timestamp columns of the postings table that can date the export, as in latest_event_at.
_POSTING_TIME_COLUMNS = ("ordered_at", "handed_over_at", "cancelled_at", "delivered_at")


def describe_future_records(tables: HistoryTables, limit: pd.Timestamp) -> str:
    """Where the timestamps after ``limit`` are: the latest one's record, and how many more.

    The latest timestamp is what would have become ``as_of``; naming its file and line lets
    the seller fix the record rather than search the export for it.
    """
    sources = [
        (tables.postings, column, f"{column} of posting {{posting_number}}")
        for column in _POSTING_TIME_COLUMNS
    ]
    sources.append((tables.events, "at", "a {kind} event"))
    latest: tuple[pd.Timestamp, str] | None = None
    count = 0
    for frame, column, what in sources:
        late = frame[column].where((frame[column] > limit).fillna(False).to_numpy(dtype=bool))
        count += int(late.notna().sum())
        if late.notna().any():
            row = frame.loc[late.idxmax()]
            if latest is None or row[column] > latest[0]:
                where = f"{row['source_file']} line {row['source_line']}"
                latest = (row[column], f"{what.format(**row.to_dict())}, {where}")
    if latest is None:
        return "no record located"
    others = count - 1
    more = f"; {others} more timestamp{'s' if others > 1 else ''} in the future" if others else ""
    return latest[1] + more


def _utc(moment: pd.Timestamp) -> pd.Timestamp:
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


def iter_score_chunks(
    tables: HistoryTables,
    model: ScoringModel,
    as_of: pd.Timestamp,
    options: ScoringOptions,
    tally: ScoreTally,
    progress: Progress | None = None,
) -> Iterator[pa.Table]:
    """Score every posting open at ``as_of``, one Arrow table per chunk of postings.

    ``tally`` accumulates the counts and the time spent per step (features, predict, explain,
    format) as the chunks are consumed.
    """
    from core.features import build_features

    progress = progress or Progress()
    risk_model = model.risk_model

    # Worker processes start and load the model while the features are built.
    in_workers = options.workers > 1 and len(tables.postings) > options.chunk_rows
    with WorkerPool(model, as_of, options) if in_workers else nullcontext() as pool:
        started = time.perf_counter()
        with progress.stage("features"):
            features = build_features(tables, as_of, aggregates=risk_model.aggregates)
        tally.add_time("features", started)
        yield from _score_in_chunks(features, tables, model, as_of, options, tally, progress, pool)


def _score_in_chunks(
    features: pd.DataFrame,
    tables: HistoryTables,
    model: ScoringModel,
    as_of: pd.Timestamp,
    options: ScoringOptions,
    tally: ScoreTally,
    progress: Progress,
    pool: WorkerPool | None,
) -> Iterator[pa.Table]:
    order_numbers = (
        tables.postings.drop_duplicates("posting_number")
        .set_index("posting_number")["order_number"]
        .reindex(features.index)
        .to_numpy(dtype=object, na_value=None)
    )
    logger.info("%d postings open at %s", len(features), as_of.isoformat())
    bounds = [
        (start, start + options.chunk_rows) for start in range(0, len(features), options.chunk_rows)
    ]
    chunks = ((features.iloc[start:stop], order_numbers[start:stop]) for start, stop in bounds)
    with progress.stage("score", total=len(features)):
        if pool is not None:
            scored = pool.score(chunks, tally)
        else:
            scored = (build_score_chunk(*chunk, model, as_of, options, tally) for chunk in chunks)
        for table in scored:
            yield table
            progress.advance(table.num_rows)
