"""One chunk of a shop's open postings scored: the output rows and what they add up to.

Each chunk is one vectorised pass (one booster call for the scores, one for all the
counterfactuals of its medium- and high-risk rows) and comes out as an Arrow table with
:data:`OUTPUT_SCHEMA`, rows ordered by ``posting_number``. The same code runs in the job's own
process (:mod:`batch.scoring`) and in its worker processes
(:mod:`batch.parallel`), which is why it depends on neither.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from core.ingest.jsonlines import paused_garbage_collector

if TYPE_CHECKING:
    from batch.models import ScoringModel
    from core.explain import ExplanationColumns
    from core.playbook import Playbook

DEFAULT_CHUNK_ROWS = 100_000
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


@dataclass(frozen=True)
class ScoringOptions:
    """How a shop is scored, besides the model and ``as_of``."""

    lang: str = "en"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    playbook: Playbook | None = None
    workers: int = 1  # processes scoring chunks side by side (batch.parallel)

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
    from core.explain import build_explanation_columns

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
