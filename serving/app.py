"""The FastAPI application: routes, dependencies, error handling and the model's lifespan.

:func:`create_app` builds an application from a :class:`ServiceSettings`; nothing happens at
import time. The model is loaded in the lifespan (``ModelStore.load_initial``, in a worker
thread), and optionally polled for a new version. Scoring requests are prepared in the request
handler (the fast path) or in a worker thread (the reference path) and scored together with
the requests that arrived in the same turn of the event loop (:class:`MicroBatcher`).

Errors: a body that is not JSON, a missing or mistyped field, an impossible value or a record
the ingestion rejects is a 422 whose ``detail`` lists ``{loc, msg, type}``; no key is 401, a
scoring key on an admin route 403, a body over the limit 413, no model 503. An unexpected
exception is a 500 whose log names only the exception type and where it was raised (never the
request's content).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import METRICS_CONTENT_TYPE, HTTPMetricsMiddleware, ServiceMetrics
from serving.model_store import (
    LoadedModel,
    ModelRecord,
    ModelStore,
    ReloadOutcome,
    apply_registry_settings,
)
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
)
from serving.scoring import (
    MicroBatcher,
    ModelScorer,
    PreparedPosting,
    ScoredPosting,
    ScoreJob,
)
from serving.security import (
    AdminKeyDep,
    BodySizeLimitMiddleware,
    KeyRing,
    ScoringKeyDep,
)
from serving.settings import ServiceSettings
from serving.validation import FieldError, Loc, RequestRejected

logger = logging.getLogger(__name__)

NowNs = Callable[[], int]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MICRO_BATCH = 64


def wall_clock_ns() -> int:
    """Now in UTC nanoseconds, at microsecond precision (as a request's as_of)."""
    return time.time_ns() // 1000 * 1000


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


# --- state and dependencies --------------------------------------------------------------------


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


def _json(model: Any, status_code: int = 200) -> Response:
    return Response(
        content=model.model_dump_json(), media_type="application/json", status_code=status_code
    )


def _errors_body(errors: Sequence[FieldError]) -> dict[str, Any]:
    return {"detail": [error.to_dict() for error in errors]}


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
    responses={503: {"model": MessageResponse, "description": "No model is loaded."}},
    tags=["health"],
)
async def readyz(loaded: ModelDep) -> ReadyResponse:
    """A model is loaded and requests can be scored."""
    return ReadyResponse(
        status="ready", model_version=loaded.record.version, source=loaded.record.source
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
    job = _job(body)
    prefix: Loc = ("body",)
    as_of = scorer.resolve_as_of(job, state.now_ns(), state.settings.max_clock_skew_seconds, prefix)
    prepared = scorer.prepare_fast(job, as_of, prefix)
    if prepared is None:
        prepared = await run_in_threadpool(scorer.prepare_reference, job, as_of, prefix)
    scored = await state.batcher.submit((scorer, prepared))
    state.metrics.scores.labels(scored.risk_level, scored.path).inc()
    return _json(score_response(scored, model_ref(loaded.record)))


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


# --- the application ---------------------------------------------------------------------------


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    detail = []
    for error in exc.errors():
        message = error.get("msg", "invalid value")
        context = error.get("ctx") or {}
        if error.get("type") == "json_invalid" and "error" in context:
            message = f"the body is not valid JSON: {context['error']}"
        detail.append(
            {"loc": list(error.get("loc", ())), "msg": message, "type": error.get("type", "")}
        )
    return detail


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.app.state.service.metrics.rejected.inc()
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        request.app.state.service.metrics.rejected.inc()
        return JSONResponse(_errors_body(exc.errors), status_code=422)


class ErrorShieldMiddleware:
    """Turns an unexpected exception into a 500 and logs only its type and where it was raised.

    Starlette's own handler re-raises for the server to log the traceback, whose message may
    quote the request; this one does not.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = (
                f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
            )
            logger.error("unexpected %s at %s", type(exc).__name__, where)
            if not started:
                response = JSONResponse({"detail": "internal error"}, status_code=500)
                await response(scope, receive, send)


async def _poll_model(state: ServiceState) -> None:
    while True:
        await asyncio.sleep(state.settings.model_poll_seconds)
        async with state.reload_lock:
            outcome = await run_in_threadpool(state.store.check_for_update)
        if outcome is not None:
            state.metrics.reloads.labels(outcome.status).inc()
            state.record_model(outcome.current)


def create_app(
    settings: ServiceSettings,
    *,
    store: ModelStore | None = None,
    now_ns: NowNs = wall_clock_ns,
    freeze_startup_objects: bool = False,
) -> FastAPI:
    """The service application for ``settings`` (a ``store`` may be given, e.g. in tests).

    ``freeze_startup_objects`` (the server process sets it) moves everything alive after the
    model is loaded out of the garbage collector's sight.
    """
    metrics = ServiceMetrics()
    state = ServiceState(settings, store or ModelStore(settings), metrics, now_ns)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_configured:
            logger.warning(
                "no API keys configured (CANCEL_RISK_API_KEYS, CANCEL_RISK_ADMIN_KEY): "
                "every scoring request will get 401"
            )
        if state.store.current is None:
            await run_in_threadpool(state.store.load_initial)
        loaded = state.store.current
        state.record_model(None if loaded is None else loaded.record)
        if freeze_startup_objects:
            # What is imported and loaded by now lives as long as the process: keep the garbage
            # collector from rescanning it on every full collection.
            gc.collect()
            gc.freeze()
        if loaded is None:
            logger.error("no model could be loaded: /readyz and scoring answer 503")
        poller = None
        if settings.model_poll_seconds > 0:
            poller = asyncio.create_task(_poll_model(state))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller

    app = FastAPI(
        title="ozon-cancel-risk",
        summary="Which open Ozon orders the buyer is about to cancel, why, and what to do.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = state
    app.state.keys = KeyRing(settings)
    app.include_router(router)
    _install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
        )
    app.add_middleware(ErrorShieldMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    return app


def run_server(settings: ServiceSettings) -> None:
    """Serve ``settings`` with uvicorn: one worker, uvloop and httptools, until interrupted."""
    import uvicorn

    logging.getLogger("serving").setLevel(settings.log_level.upper())
    apply_registry_settings(settings)
    logger.info(
        "serving %s on http://%s:%d (fast path %s)",
        settings.model_uri,
        settings.host,
        settings.port,
        "on" if settings.fast_path else "off",
    )
    uvicorn.run(
        create_app(settings, freeze_startup_objects=True),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=settings.access_log,
        log_level=settings.log_level,
        server_header=False,
    )
