"""What the routes share, and the dependencies that hand it to them.

:class:`ServiceState` holds the settings, the metrics, the model store and the micro-batcher; a
route gets it (:data:`StateDep`) or the model being served (:data:`ModelDep`, 503 while none is
loaded) as a dependency. Requests waiting in the batcher are scored together, one call per
model; when such a call fails, its rows are scored one by one, so that one bad row fails only
itself (:func:`score_isolated`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

from fastapi import Depends, Request, status
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import ServiceMetrics
from serving.model_store import LoadedModel, ModelRecord, ModelStore
from serving.scoring import MicroBatcher, ModelScorer, PreparedPosting, ScoredPosting
from serving.settings import ServiceSettings

NowNs = Callable[[], int]
# A readiness check: (ready, message). Not ready: /readyz answers 503 with the message; ready
# with a message: /readyz lists it as a warning.
ReadinessCheck = Callable[[], Awaitable[tuple[bool, str | None]]]
_MAX_MICRO_BATCH = 64


class ServiceState:
    """What the routes share: settings, keys, metrics, the model store, the batcher."""

    def __init__(
        self,
        settings: ServiceSettings,
        store: ModelStore,
        metrics: ServiceMetrics,
        now_ns: NowNs,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.now_ns = now_ns
        self.reload_lock = asyncio.Lock()
        self.readiness_checks: list[ReadinessCheck] = []
        self.batcher: MicroBatcher[tuple[ModelScorer, PreparedPosting], ScoredPosting] = (
            MicroBatcher(self._score_prepared, _MAX_MICRO_BATCH)
        )

    def _score_prepared(
        self, jobs: list[tuple[ModelScorer, PreparedPosting]]
    ) -> list[ScoredPosting | BaseException]:
        """Score waiting requests together, one call per model (a reload may sit between)."""
        results: list[ScoredPosting | BaseException] = [RuntimeError("not scored")] * len(jobs)
        by_scorer: dict[int, list[int]] = {}
        for i, (scorer, _) in enumerate(jobs):
            by_scorer.setdefault(id(scorer), []).append(i)
        for positions in by_scorer.values():
            scorer = jobs[positions[0]][0]
            outcomes = score_isolated(scorer, [jobs[i][1] for i in positions])
            self.metrics.batch_size.observe(len(positions))
            for i, outcome in zip(positions, outcomes, strict=True):
                results[i] = outcome
        return results

    def record_model(self, record: ModelRecord | None) -> None:
        if record is not None:
            self.metrics.set_model(
                record.name,
                record.version,
                record.alias,
                record.feature_version,
                record.source,
                record.scoring_path,
            )


def score_isolated(
    scorer: ModelScorer, prepared: Sequence[PreparedPosting]
) -> list[ScoredPosting | Exception]:
    """Score rows together; if that fails, one by one, so one bad row fails only itself."""
    try:
        return list(scorer.score(prepared))
    except Exception as exc:
        if len(prepared) == 1:
            return [exc]
    outcomes: list[ScoredPosting | Exception] = []
    for row in prepared:
        try:
            outcomes.extend(scorer.score([row]))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


# Dependencies are coroutines: FastAPI would run plain functions in a worker thread.
async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_loaded_model(state: StateDep) -> LoadedModel:
    loaded = state.store.current
    if loaded is None:
        reason = state.store.last_error or "the model has not been loaded"
        raise StarletteHTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"no model is loaded: {reason}",
        )
    return loaded


ModelDep = Annotated[LoadedModel, Depends(get_loaded_model)]
