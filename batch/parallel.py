"""Score chunks in worker processes, side by side on the machine's cores.

Scoring a chunk (its predict, its counterfactuals, the reasons' texts and JSON cells) keeps one
core busy, however many the machine has. With ``workers`` above one, the chunks of
:func:`batch.scoring.iter_score_chunks` are scored by that many processes running the
same :func:`~batch.chunk.build_score_chunk`:

- workers are spawned, not forked: the parent holds LightGBM's OpenMP threads and Arrow's pools,
  which a fork would copy in a state the child cannot use;
- each worker loads the model once, from the plain files the parent saved (``RiskModel.save``:
  no pickled model crosses);
- at most ``2 × workers`` chunks are in flight and results come back in chunk order, so memory
  stays bounded and the output is the same bytes as one process writes.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from batch.chunk import ScoreTally, ScoringOptions, build_score_chunk
from batch.models import ScoringModel

_worker: dict[str, object] = {}


def _start_worker(
    model_dir: str, name: str, version: str, uri: str, as_of_ns: int, options: ScoringOptions
) -> None:
    from core.model import RiskModel

    _worker["model"] = ScoringModel(RiskModel.load(model_dir), name, version, uri)
    _worker["as_of"] = pd.Timestamp(as_of_ns, tz="UTC")
    _worker["options"] = options


def _score_chunk(features: pd.DataFrame, order_numbers: np.ndarray) -> tuple[pa.Table, ScoreTally]:
    tally = ScoreTally()
    table = build_score_chunk(
        features,
        order_numbers,
        _worker["model"],  # type: ignore[arg-type]
        _worker["as_of"],  # type: ignore[arg-type]
        _worker["options"],  # type: ignore[arg-type]
        tally,
    )
    return table, tally


class WorkerPool:
    """``options.workers`` scoring processes, started (and loading the model) at once, so they
    are ready by the time the features are built."""

    def __init__(self, model: ScoringModel, as_of: pd.Timestamp, options: ScoringOptions) -> None:
        self.workers = options.workers
        self._staging = tempfile.TemporaryDirectory(prefix="cancel-risk-workers-")
        model_dir = model.risk_model.save(Path(self._staging.name) / "model")
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(str(model_dir), model.name, model.version, model.uri, as_of.value, options),
        )
        for _ in range(self.workers):  # each submission starts a worker while there are fewer
            self._pool.submit(_ready)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._staging.cleanup()

    def score(
        self, chunks: Iterator[tuple[pd.DataFrame, np.ndarray]], tally: ScoreTally
    ) -> Iterator[pa.Table]:
        """Each chunk's Arrow table, in chunk order; the workers' counts and step times (summed
        over workers) are added to ``tally``."""
        pending: deque[Future] = deque()
        for features, order_numbers in chunks:
            pending.append(self._pool.submit(_score_chunk, features, order_numbers))
            if len(pending) >= 2 * self.workers:
                yield _collect(pending.popleft(), tally)
        while pending:
            yield _collect(pending.popleft(), tally)


def _ready() -> None:
    """A no-op: the first task of each worker, submitted only to start it."""


def _collect(future: Future, tally: ScoreTally) -> pa.Table:
    table, part = future.result()
    tally.scored += part.scored
    tally.risk_levels.update(part.risk_levels)
    tally.decisions.update(part.decisions)
    tally.seconds.update(part.seconds)
    return table
