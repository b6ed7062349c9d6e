"""Prometheus metrics of one service instance (its own registry, not the process-global one).

- ``cancel_risk_http_requests_total`` and ``cancel_risk_http_request_duration_seconds`` by route
  template, method and status (unknown paths are one ``unmatched`` route, so scanners cannot
  blow up the label set);
- ``cancel_risk_scores_total`` by risk level and scoring path, and
  ``cancel_risk_rejected_postings_total``;
- ``cancel_risk_scoring_batch_size``: postings per scoring call (concurrent single requests
  share calls);
- ``cancel_risk_model_info`` (1 for the model being served, its labels say which) and
  ``cancel_risk_model_reloads_total`` by outcome.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cancel_risk_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cancel_risk_http_request_duration_seconds",
            "Time from receiving a request to sending its last byte.",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scores = Counter(
            "cancel_risk_scores",
            "Postings scored, by risk level and scoring path (fast or reference).",
            ["risk_level", "path"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "cancel_risk_rejected_postings",
            "Postings refused with field errors (422, or an error entry in a batch).",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cancel_risk_scoring_batch_size",
            "Postings per scoring call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.model_info = Gauge(
            "cancel_risk_model_info",
            "The model being served (value 1; the labels say which).",
            ["name", "version", "alias", "feature_version", "source", "scoring_path"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "cancel_risk_model_reloads",
            "Model reloads by outcome (loaded, unchanged, refused, not_found, unreachable).",
            ["outcome"],
            registry=self.registry,
        )

    def set_model(
        self,
        name: str,
        version: str | None,
        alias: str | None,
        feature_version: str,
        source: str,
        scoring_path: str,
    ) -> None:
        self.model_info.clear()
        self.model_info.labels(
            name, version or "", alias or "", feature_version, source, scoring_path
        ).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by its route template."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def recording_send(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (template, scope.get("method", ""), str(status_code))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
