"""The service with the live order book: the scoring service's routes plus the book's.

:func:`create_live_app` takes the application of :func:`serving.app.create_app` and adds

- Ozon's push endpoint (:mod:`live.push`), the book's routes (:mod:`live.routes`) and the
  seller dashboard at ``/ui`` (:mod:`live.ui`),
- in its lifespan: the book (opened and migrated), its writer thread
  (:class:`live.writer.BookWriter`) and the worker process (:mod:`live.worker`),
- a readiness check (the book answers; failing alert channels are reported as warnings, not
  as unreadiness: the push endpoint must keep answering) and metrics read from the book at each
  scrape (open postings by risk, pending re-scores, unsent alerts, failing channels).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool

from live.book import OrderBook, book_status, channel_health, redacted
from live.push import PushMetrics, build_push_router
from live.routes import build_live_router
from live.settings import LiveSettings
from live.worker import WorkerProcess, start_worker_process
from live.writer import BookWriter
from serving.app import create_app, serve_app, wall_clock_ns
from serving.model_store import ModelStore

logger = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005


class LiveState:
    """The book, its writer and the worker, once the lifespan has started them."""

    def __init__(self, settings: LiveSettings, channel_names: list[str]) -> None:
        self.settings = settings
        self.channel_names = channel_names
        self.book: OrderBook | None = None
        self.writer: BookWriter | None = None
        self.worker: WorkerProcess | None = None

    def require_writer(self) -> BookWriter:
        if self.writer is None:
            raise RuntimeError("the order book is not open")
        return self.writer

    def require_engine(self) -> Engine:
        if self.book is None:
            raise RuntimeError("the order book is not open")
        return self.book.engine


class BookCollector:
    """Gauges read from the book when Prometheus scrapes (the worker is another process)."""

    def __init__(self, live: LiveState) -> None:
        self.live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.live.book is None:
            return
        try:
            with self.live.book.engine.connect() as connection:
                status = book_status(connection)
                health = channel_health(connection, self.live.channel_names)
        except Exception as exc:
            logger.warning("book metrics unavailable: %s", type(exc).__name__)
            return
        by_risk = GaugeMetricFamily(
            "cancel_risk_book_open_postings",
            "Open postings in the book by risk level.",
            labels=["risk_level"],
        )
        for level, count in sorted(status["open_by_risk"].items()):
            by_risk.add_metric([level], count)
        yield by_risk
        yield GaugeMetricFamily(
            "cancel_risk_book_pending_postings",
            "Open postings with records not yet re-scored.",
            value=status["pending"],
        )
        unsent = GaugeMetricFamily(
            "cancel_risk_alerts_unsent",
            "Alerts in the outbox not yet delivered, by channel.",
            labels=["channel"],
        )
        failing = GaugeMetricFamily(
            "cancel_risk_alert_channel_failing",
            "1 when the channel's last delivery failed (consecutive failures in the label-less "
            "companion metric).",
            labels=["channel"],
        )
        failures = GaugeMetricFamily(
            "cancel_risk_alert_channel_consecutive_failures",
            "Consecutive failed deliveries to the channel.",
            labels=["channel"],
        )
        for channel in health:
            unsent.add_metric([channel.channel], channel.unsent)
            failing.add_metric([channel.channel], 1.0 if channel.failing else 0.0)
            failures.add_metric([channel.channel], channel.consecutive_failures)
        yield unsent
        yield failing
        yield failures


def _channel_names(settings: LiveSettings) -> list[str]:
    from live.alerts import parse_channels

    return [channel.name for channel in parse_channels(settings.alert_channels)]


def create_live_app(
    settings: LiveSettings,
    *,
    store: ModelStore | None = None,
    start_worker: bool = True,
    freeze_startup_objects: bool = False,
) -> FastAPI:
    """The service application with the live book (see the module docstring).

    ``start_worker=False`` leaves re-scoring to a worker run elsewhere (``cancel-risk worker``,
    or a test's own :class:`live.worker.Rescorer`).
    """
    app = create_app(settings, store=store, freeze_startup_objects=freeze_startup_objects)
    state = app.state.service
    live = LiveState(settings, _channel_names(settings))
    app.state.live = live

    def book_now() -> int:
        if settings.clock == "events" and live.writer is not None and live.writer.clock:
            return live.writer.clock
        return wall_clock_ns()

    push_metrics = PushMetrics(state.metrics.registry)
    state.metrics.registry.register(BookCollector(live))
    app.include_router(build_push_router(settings, live.require_writer, push_metrics, book_now))
    app.include_router(
        build_live_router(live.require_writer, live.require_engine, book_now, live.channel_names)
    )
    if settings.ui:
        from live.ui import STATIC_DIR, build_ui_router

        app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
        app.include_router(build_ui_router(settings, live.require_engine, book_now))

    async def book_ready() -> tuple[bool, str | None]:
        def probe() -> list[str]:
            with live.require_engine().connect() as connection:
                connection.execute(text("SELECT 1"))
                health = channel_health(connection, live.channel_names)
            return [
                f"alert channel {h.channel} failing ({h.consecutive_failures}x): {h.last_error}"
                for h in health
                if h.failing
            ]

        try:
            warnings = await run_in_threadpool(probe)
        except Exception as exc:
            return False, f"the order book is unavailable: {type(exc).__name__}"
        return True, "; ".join(warnings) or None

    state.readiness_checks.append(book_ready)
    serving_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[Any]:
        url = settings.db_url.get_secret_value()
        started = time.perf_counter()
        live.book = await run_in_threadpool(OrderBook, url)
        logger.info(
            "order book %s open (%.2f s); pushes at %s",
            redacted(url),
            time.perf_counter() - started,
            settings.push_path,
        )
        live.writer = BookWriter(live.book.writes)
        live.writer.start()
        if start_worker and settings.worker:
            live.worker = start_worker_process(settings)
        try:
            async with serving_lifespan(application) as value:
                yield value
        finally:
            if live.worker is not None:
                await run_in_threadpool(live.worker.stop)
            live.writer.stop()
            live.book.close()

    app.router.lifespan_context = lifespan
    return app


def run_live_server(settings: LiveSettings) -> None:
    """Serve the live application with uvicorn, as :func:`serving.app.run_server` does."""
    from serving.model_loading import apply_registry_settings

    logging.getLogger("serving").setLevel(settings.log_level.upper())
    logging.getLogger("live").setLevel(settings.log_level.upper())
    apply_registry_settings(settings)
    # The writer thread and the event loop hand the GIL to each other for every push: switch
    # sooner than Python's default 5 ms, or a push waits out the other thread's time slice.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logger.info(
        "serving %s with the live book on http://%s:%d",
        settings.model_uri,
        settings.host,
        settings.port,
    )
    serve_app(
        create_live_app(settings, freeze_startup_objects=True),
        settings,
        # The push allow-list reads the client's address: X-Forwarded-For only when told
        # (CANCEL_RISK_TRUST_FORWARDED_FOR, read by live.push), never by uvicorn's own default.
        proxy_headers=False,
    )
