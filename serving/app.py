"""The FastAPI application: the model's lifespan, error handling and the middleware.

:func:`create_app` builds an application from a :class:`ServiceSettings`; nothing happens at
import time. The model is loaded in the lifespan (``ModelStore.load_initial``, in a worker
thread), and optionally polled for a new version. The routes are :mod:`serving.routes`; what
they share (the model store, the micro-batcher, the metrics) is :mod:`serving.state`.

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
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import HTTPMetricsMiddleware, ServiceMetrics
from serving.model_loading import apply_registry_settings
from serving.model_store import ModelStore
from serving.routes import router
from serving.security import BodySizeLimitMiddleware, KeyRing
from serving.settings import ServiceSettings
from serving.state import NowNs, ServiceState
from serving.validation import FieldError, RequestRejected

logger = logging.getLogger(__name__)


def wall_clock_ns() -> int:
    """Now in UTC nanoseconds, at microsecond precision (as a request's as_of)."""
    return time.time_ns() // 1000 * 1000


# --- the application ---------------------------------------------------------------------------


def _errors_body(errors: Sequence[FieldError]) -> dict[str, Any]:
    return {"detail": [error.to_dict() for error in errors]}


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
    logging.getLogger("serving").setLevel(settings.log_level.upper())
    apply_registry_settings(settings)
    logger.info(
        "serving %s on http://%s:%d (fast path %s)",
        settings.model_uri,
        settings.host,
        settings.port,
        "on" if settings.fast_path else "off",
    )
    serve_app(create_app(settings, freeze_startup_objects=True), settings)


def serve_app(app: FastAPI, settings: ServiceSettings, **options: Any) -> None:
    """Serve ``app`` with uvicorn until interrupted: one worker, uvloop and httptools."""
    import uvicorn

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=settings.access_log,
        log_level=settings.log_level,
        server_header=False,
        **options,
    )
