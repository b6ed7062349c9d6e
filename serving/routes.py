"""The service's routes: health and metrics, the model being served, and scoring.

``POST /v1/score`` prepares its posting in the request handler (the fast path) or in a worker
thread (the reference path) and scores it with the requests that arrived in the same turn of the
event loop (:class:`MicroBatcher`); ``POST /v1/score/batch`` prepares and scores its postings in
a worker thread, each posting that cannot be scored getting its own error entry. ``POST
/v1/whatif`` prepares its posting as ``/v1/score`` does (:func:`prepare_request`) and answers
its risk after each action the seller can take (:mod:`core.whatif`). Bodies are decoded with
orjson (:class:`JSONRoute`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from serving.metrics import METRICS_CONTENT_TYPE
from serving.model_store import ModelRecord, ReloadOutcome
from serving.schemas import (
    BatchRequest,
    BatchResponse,
    BatchResult,
    ErrorDetail,
    HealthResponse,
    InvalidItem,
    MessageResponse,
    ModelInfo,
    ModelRef,
    ReadyResponse,
    ReasonOut,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
    ValidationErrorResponse,
    WhatIfActionOut,
    WhatIfResponse,
)
from serving.scoring import (
    ModelScorer,
    PostingWhatIf,
    PreparedPosting,
    ScoredPosting,
    ScoreJob,
    posting_currency,
)
from serving.security import AdminKeyDep, ScoringKeyDep
from serving.state import ModelDep, ServiceState, StateDep, score_isolated
from serving.validation import FieldError, Loc, RequestRejected

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _to_ns(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _to_datetime(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


# --- request parsing with orjson -----------------------------------------------------------------


class _OrjsonRequest(Request):
    """Decodes JSON bodies with orjson (faster; refuses lone surrogates, NaN and 1e309)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return route_handler


# --- responses ---------------------------------------------------------------------------------


def model_ref(record: ModelRecord) -> ModelRef:
    return ModelRef(
        name=record.name, version=record.version, feature_version=record.feature_version
    )


def model_info(record: ModelRecord) -> ModelInfo:
    return ModelInfo(
        name=record.name,
        version=record.version,
        alias=record.alias,
        uri=record.uri,
        source=record.source,
        feature_version=record.feature_version,
        run_id=record.run_id,
        training_period=record.training_period,
        holdout_metrics=record.holdout_metrics,
        loaded_at=record.loaded_at,
        registry_error=record.registry_error,
        scoring_path=record.scoring_path,  # type: ignore[arg-type]
        fast_path_note=record.fast_path_note,
    )


def score_response(scored: ScoredPosting, reference: ModelRef) -> ScoreResponse:
    explanation = scored.explanation
    return ScoreResponse(
        posting_number=scored.posting_number,
        as_of=_to_datetime(scored.as_of),
        probability=scored.probability,
        risk_level=scored.risk_level,  # type: ignore[arg-type]
        reasons=[
            ReasonOut(
                code=reason.code,
                share=reason.share,
                risk_drop=reason.risk_drop,
                facts=reason.facts,
                values=reason.values,
            )
            for reason in explanation.reasons
        ],
        actions=list(explanation.actions),
        decision=explanation.decision,  # type: ignore[arg-type]
        expected_saving=explanation.expected_saving,
        model=reference,
    )


def what_if_response(answer: PostingWhatIf, reference: ModelRef) -> WhatIfResponse:
    return WhatIfResponse(
        posting_number=answer.posting_number,
        as_of=_to_datetime(answer.as_of),
        probability=answer.probability,
        risk_level=answer.risk_level,  # type: ignore[arg-type]
        currency=answer.currency,
        actions=[
            WhatIfActionOut(
                action=what_if.action,  # type: ignore[arg-type]
                title=what_if.title,
                basis=what_if.basis,
                probability_after=what_if.probability_after,
                risk_level_after=what_if.risk_level_after,  # type: ignore[arg-type]
                risk_drop=what_if.risk_drop,
                amount=what_if.amount,
                currency=what_if.currency,
            )
            for what_if in answer.actions
        ],
        model=reference,
    )


def _json(model: Any, status_code: int = 200) -> Response:
    return Response(
        content=model.model_dump_json(), media_type="application/json", status_code=status_code
    )


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": MessageResponse, "description": "No API key, or an unknown one."},
    413: {"model": MessageResponse, "description": "The body is larger than the limit."},
    422: {"model": ValidationErrorResponse, "description": "The request cannot be scored."},
    503: {"model": MessageResponse, "description": "No model is loaded."},
}


# --- routes ------------------------------------------------------------------------------------

router = APIRouter(route_class=JSONRoute)


def _job(body: ScoreRequest) -> ScoreJob:
    return ScoreJob(
        posting=body.posting,
        pushes=body.pushes,
        prices=body.prices,
        tracking=body.tracking,
        as_of=None if body.as_of is None else _to_ns(body.as_of),
        lang=body.lang,
    )


@router.get("/healthz", response_model=HealthResponse, tags=["health"])
async def healthz() -> HealthResponse:
    """The process is alive."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={
        503: {"model": MessageResponse, "description": "No model is loaded, or a check failed."}
    },
    tags=["health"],
)
async def readyz(loaded: ModelDep, state: StateDep) -> ReadyResponse | JSONResponse:
    """A model is loaded and requests can be scored (and the service's other checks hold)."""
    warnings = []
    for check in state.readiness_checks:
        ready, message = await check()
        if not ready:
            return JSONResponse({"detail": message}, status_code=503)
        if message:
            warnings.append(message)
    return ReadyResponse(
        status="ready",
        model_version=loaded.record.version,
        source=loaded.record.source,
        warnings=warnings,
    )


@router.get(
    "/metrics",
    response_model=None,
    response_class=Response,
    responses={200: {"content": {METRICS_CONTENT_TYPE: {}}, "description": "Prometheus text."}},
    tags=["health"],
)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics: requests and latencies by route and status, scores, the model."""
    return Response(content=state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={k: v for k, v in _ERROR_RESPONSES.items() if k in (401, 503)},
    tags=["model"],
)
async def get_model(_: ScoringKeyDep, loaded: ModelDep) -> ModelInfo:
    """The model being served: name, version, alias, feature version, training period, metrics."""
    return model_info(loaded.record)


@router.post(
    "/v1/model/reload",
    response_model=ReloadResponse,
    responses={
        401: _ERROR_RESPONSES[401],
        403: {"model": MessageResponse, "description": "A scoring key, not the admin key."},
        409: {"model": ReloadResponse, "description": "The new model was refused."},
        503: {"model": ReloadResponse, "description": "The tracking server is unreachable."},
    },
    tags=["model"],
)
async def reload_model(_: AdminKeyDep, state: StateDep) -> Response:
    """Load the alias's current version; a broken or incompatible one is refused."""
    async with state.reload_lock:
        outcome: ReloadOutcome = await run_in_threadpool(state.store.reload)
    state.metrics.reloads.labels(outcome.status).inc()
    state.record_model(outcome.current)
    body = ReloadResponse(
        status=outcome.status,
        message=outcome.message,
        previous_version=outcome.previous_version,
        model=None if outcome.current is None else model_info(outcome.current),
    )
    code = {"loaded": 200, "unchanged": 200, "unreachable": 503}.get(outcome.status, 409)
    return _json(body, code)


@router.post(
    "/v1/score", response_model=ScoreResponse, responses=_ERROR_RESPONSES, tags=["scoring"]
)
async def score(
    _: ScoringKeyDep, body: ScoreRequest, loaded: ModelDep, state: StateDep
) -> Response:
    """Score one open posting: probability, risk level, reasons, actions and decision."""
    scorer = loaded.scorer
    prepared = await prepare_request(scorer, body, state)
    scored = await state.batcher.submit((scorer, prepared))
    state.metrics.scores.labels(scored.risk_level, scored.path).inc()
    return _json(score_response(scored, model_ref(loaded.record)))


async def prepare_request(
    scorer: ModelScorer, body: ScoreRequest, state: ServiceState
) -> PreparedPosting:
    """A single route's posting checked and ready: ``as_of`` resolved against the service's
    clock, then the fast path, else the reference path in a worker thread."""
    job = _job(body)
    prefix: Loc = ("body",)
    as_of = scorer.resolve_as_of(job, state.now_ns(), state.settings.max_clock_skew_seconds, prefix)
    prepared = scorer.prepare_fast(job, as_of, prefix)
    if prepared is None:
        prepared = await run_in_threadpool(scorer.prepare_reference, job, as_of, prefix)
    return prepared


@router.post(
    "/v1/whatif", response_model=WhatIfResponse, responses=_ERROR_RESPONSES, tags=["scoring"]
)
async def what_if(
    _: ScoringKeyDep, body: ScoreRequest, loaded: ModelDep, state: StateDep
) -> Response:
    """One open posting's probability now and after each action the seller can take: refund
    the price difference, restore the card, expedite, switch carrier, confirm, hold."""
    scorer = loaded.scorer
    prepared = await prepare_request(scorer, body, state)
    (answer,) = scorer.what_if([prepared], [posting_currency(body.posting)])
    return _json(what_if_response(answer, model_ref(loaded.record)))


def score_batch_items(
    scorer: ModelScorer,
    items: Sequence[Any],
    now: int,
    max_skew_seconds: float,
) -> list[list[ErrorDetail] | ScoredPosting]:
    """Prepare every item (its errors when it cannot be scored) and score the rest, in order."""
    outcomes: list[list[ErrorDetail] | ScoredPosting | None] = [None] * len(items)
    prepared: list[tuple[int, PreparedPosting]] = []
    for i, item in enumerate(items):
        prefix: Loc = ("body", "items", i)
        if isinstance(item, InvalidItem):
            outcomes[i] = [
                ErrorDetail(loc=[*prefix, *e["loc"]], msg=e["msg"], type=e["type"])
                for e in item.errors
            ]
            continue
        job = _job(item)
        try:
            as_of = scorer.resolve_as_of(job, now, max_skew_seconds, prefix)
            ready = scorer.prepare_fast(job, as_of, prefix)
            if ready is None:
                ready = scorer.prepare_reference(job, as_of, prefix)
        except RequestRejected as exc:
            outcomes[i] = [ErrorDetail(loc=list(e.loc), msg=e.msg, type=e.type) for e in exc.errors]
            continue
        prepared.append((i, ready))
    scored = score_isolated(scorer, [p for _, p in prepared])
    for (i, _), result in zip(prepared, scored, strict=True):
        if isinstance(result, Exception):
            logger.error("batch item %d could not be scored: %s", i, type(result).__name__)
            message = "the posting could not be scored (an internal error, logged)"
            result = [ErrorDetail(loc=["body", "items", i], msg=message, type="internal_error")]
        outcomes[i] = result
    return [outcome for outcome in outcomes if outcome is not None]


@router.post(
    "/v1/score/batch",
    response_model=BatchResponse,
    responses=_ERROR_RESPONSES,
    tags=["scoring"],
)
async def score_batch(
    _: ScoringKeyDep, body: BatchRequest, loaded: ModelDep, state: StateDep
) -> Response:
    """Score up to ``max_batch_postings`` postings; each bad one gets its own error entry."""
    limit = state.settings.max_batch_postings
    if len(body.items) > limit:
        raise RequestRejected(
            [
                FieldError(
                    ("body", "items"),
                    f"at most {limit} postings per call, got {len(body.items)}",
                    "value_error.too_many",
                )
            ]
        )
    outcomes = await run_in_threadpool(
        score_batch_items,
        loaded.scorer,
        body.items,
        state.now_ns(),
        state.settings.max_clock_skew_seconds,
    )
    reference = model_ref(loaded.record)
    results = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, ScoredPosting):
            state.metrics.scores.labels(outcome.risk_level, outcome.path).inc()
            score = score_response(outcome, reference)
            results.append(BatchResult(index=i, status="scored", score=score))
        else:
            results.append(BatchResult(index=i, status="rejected", errors=outcome))
    rejected = len(results) - sum(1 for r in results if r.status == "scored")
    state.metrics.rejected.inc(rejected)
    state.metrics.batch_size.observe(len(results) - rejected)
    return _json(
        BatchResponse(
            results=results, scored=len(results) - rejected, rejected=rejected, model=reference
        )
    )
