"""Score one shop's open postings: the pandas code both the single-machine and the Spark job run.

The features of every posting open at ``as_of`` come from one call of the one feature function
(:func:`training.features.build_features`, with the aggregates the model learned in training):
a float frame of about 0.3 GB per million postings, small beside the history tables it reads.
Probabilities, risk levels, reasons, actions and decisions are then computed in chunks of
``chunk_rows`` postings: each chunk is one vectorised pass (one booster call for the scores,
one for all the counterfactuals of its medium- and high-risk rows), so what the explanations
hold in memory is bounded by the chunk, whatever the size of the export. Each chunk comes out
as an Arrow table with :data:`OUTPUT_SCHEMA`, rows ordered by ``posting_number``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from training.batch.progress import Progress
from training.ingest.jsonlines import paused_garbage_collector

if TYPE_CHECKING:
    from training.batch.models import ScoringModel
    from training.batch.parallel import WorkerPool
    from training.explain import ExplanationColumns, Playbook
    from training.tables import HistoryTables

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 100_000
FUTURE_TOLERANCE = pd.Timedelta(days=1)
UTC_MICROS = pa.timestamp("us", tz="UTC")

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("posting_number", pa.string(), nullable=False),
        pa.field("order_number", pa.string()),
        pa.field("probability", pa.float64(), nullable=False),
        pa.field("risk_level", pa.string(), nullable=False),
        pa.field("reasons", pa.string(), nullable=False),  # JSON array of {code, share, ...}
        pa.field("actions", pa.string(), nullable=False),  # JSON array of texts
        pa.field("decision", pa.string(), nullable=False),
        pa.field("expected_saving", pa.float64(), nullable=False),
        pa.field("as_of", UTC_MICROS, nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)
OUTPUT_COLUMNS: tuple[str, ...] = tuple(OUTPUT_SCHEMA.names)


class AsOfError(ValueError):
    """No scoring moment can be taken from the export (none at all, or one in the future)."""


@dataclass(frozen=True)
class ScoringOptions:
    """How a shop is scored, besides the model and ``as_of``."""

    lang: str = "en"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    playbook: Playbook | None = None
    workers: int = 1  # processes scoring chunks side by side (training.batch.parallel)

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, not {self.chunk_rows}")
        if self.workers < 1:
            raise ValueError(f"workers must be positive, not {self.workers}")


@dataclass
class ScoreTally:
    """What the scored rows add up to, and where the time went (seconds per step)."""

    scored: int = 0
    risk_levels: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)

    def add_time(self, step: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[step] += now - started
        return now


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
    from training.features import build_features

    progress = progress or Progress()
    risk_model = model.risk_model
    from training.batch.parallel import WorkerPool

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


@paused_garbage_collector()
def build_score_chunk(
    features: pd.DataFrame,
    order_numbers: np.ndarray,
    model: ScoringModel,
    as_of: pd.Timestamp,
    options: ScoringOptions,
    tally: ScoreTally,
) -> pa.Table:
    """One chunk of output rows: scores, levels, and explanations for the feature rows given.

    Reasons are computed for medium- and high-risk rows; low-risk rows carry the decision only.
    The garbage collector is paused meanwhile: the texts and JSON cells are many small objects
    and no reference cycles, and its rescans of them took a fifth of the time.
    """
    from training.explain import build_explanation_columns

    risk_model = model.risk_model
    started = time.perf_counter()
    probabilities = risk_model.score_features(features)
    levels = np.asarray(risk_model.risk_levels(probabilities), dtype=object)
    started = tally.add_time("predict", started)
    explained = build_explanation_columns(
        risk_model,
        features,
        probabilities,
        lang=options.lang,
        playbook=options.playbook,
        with_reasons=levels != "low",
    )
    started = tally.add_time("explain", started)
    reasons, actions = build_explanation_texts(explained)
    n = len(features)
    table = pa.Table.from_arrays(
        [
            pa.array(features.index.to_numpy(dtype=object), pa.string()),
            pa.array(order_numbers, pa.string()),
            pa.array(probabilities, pa.float64()),
            pa.array(levels, pa.string()),
            pa.array(reasons, pa.string()),
            pa.array(actions, pa.string()),
            pa.array(explained.decisions, pa.string()),
            pa.array(explained.savings, pa.float64()),
            pa.array(np.full(n, as_of.value // 1000, dtype="int64"), pa.int64()).cast(UTC_MICROS),
            pa.array([model.name] * n, pa.string()),
            pa.array([model.version] * n, pa.string()),
        ],
        schema=OUTPUT_SCHEMA,
    )
    tally.add_time("format", started)
    tally.scored += n
    tally.risk_levels.update(levels.tolist())
    tally.decisions.update(explained.decisions)
    return table


def build_explanation_texts(explained: ExplanationColumns) -> tuple[list[str], list[str]]:
    """The ``reasons`` and ``actions`` cells: compact JSON arrays, the REST service's shapes.

    Many postings share one list of actions (and every low-risk one has no reasons), so each
    distinct actions list is encoded once.
    """
    reasons = [
        orjson.dumps(listed).decode() if listed else "[]" for listed in explained.reason_lists()
    ]
    encoded: dict[tuple[str, ...], str] = {}
    actions = []
    for listed in explained.actions:
        text = encoded.get(listed)
        if text is None:
            text = encoded[listed] = orjson.dumps(list(listed)).decode()
        actions.append(text)
    return reasons, actions


def empty_scores() -> pa.Table:
    return OUTPUT_SCHEMA.empty_table()
