"""Ozon's push endpoint: notifications in, committed to the book, answered as Ozon's document says.

Ozon (``push_start``, ``push_types``, ``push_resending`` in its Seller API document) sends each
notification as a ``POST`` of one JSON object to the URL the seller registered, and expects:

- ``TYPE_PING`` (the connection check, at registration and periodically): HTTP 200 with
  ``{"version", "name", "time"}``, ``time`` the moment processing began, in UTC;
- any other notification: HTTP 200 once it is handled (here: ``{"result": true}`` once it is
  committed to the book, or recognised as one the book already holds, or of a type the book does
  not keep: chats, stocks, price indexes);
- an error: a 4xx or 5xx with ``{"error": {"code", "message", "details"}}``, ``code`` one of
  ``ERROR_UNKNOWN``, ``ERROR_PARAMETER_VALUE_MISSED``, ``ERROR_REQUEST_DUPLICATED``.

Ozon suspends a URL that answers slower than 5 s, or 200 to fewer than half of its
notifications, and retries an undelivered one with growing intervals. So:

- the answer waits only for the commit of the record (:class:`live.writer.BookWriter`, shared
  with other pushes arriving at the same time), never for re-scoring, which the worker does;
- a notification received again (a retry, or a replay) is answered 200 like the first time: the
  book keeps it once. ``ERROR_REQUEST_DUPLICATED`` is not used: an error would count against the
  URL for a notification that was in fact delivered;
- a notification that cannot be stored because the book is unreachable is answered 503 with
  ``ERROR_UNKNOWN``, never 200: Ozon sends it again later;
- a notification that is not usable (not a JSON object, no ``message_type``, a kept type
  without its ``posting_number``/``offer_id``/``new_state``, or an unreadable time) is 400 with
  ``ERROR_PARAMETER_VALUE_MISSED`` (a value is missing) or ``ERROR_UNKNOWN`` (one is wrong),
  the message naming the field. Retrying it would not help; it is logged and counted.

Access: optionally, a shared secret (``CANCEL_RISK_PUSH_SECRET``) as the last segment of the
registered URL (``https://host/v1/ozon/push/<secret>``) or in an ``X-Push-Secret`` header
(for a proxy that adds it), and an allow-list of source networks
(``CANCEL_RISK_PUSH_ALLOWED_NETS``; ``ozon`` stands for Ozon's published ones). Both refusals
are 403 in Ozon's shape.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter

from core.ingest.events import PUSH_SPECS
from live.book import CUTOFF_PUSH, KEPT_PUSH_TYPES, accept_push, read_moment
from live.settings import LiveSettings
from live.writer import BookWriter

logger = logging.getLogger(__name__)

APP_NAME = "ozon-cancel-risk"
PING = "TYPE_PING"
UNKNOWN = "ERROR_UNKNOWN"
MISSED = "ERROR_PARAMETER_VALUE_MISSED"
_OK = orjson.dumps({"result": True})

# What each kept type must carry, besides its message_type.
_REQUIRED: dict[str, tuple[str, ...]] = {
    name: ("offer_id",) if spec.key == "offer" else ("posting_number",)
    for name, spec in PUSH_SPECS.items()
}
_REQUIRED["TYPE_STATE_CHANGED"] = ("posting_number", "new_state")
_REQUIRED[CUTOFF_PUSH] = ("posting_number",)
_TIME_FIELDS = (
    "in_process_at",
    "changed_state_date",
    "changed_at",
    "received_at",
    "new_delivery_date_begin",
    "new_delivery_date_end",
    "old_delivery_date_begin",
    "old_delivery_date_end",
    "new_cutoff_date",
    "old_cutoff_date",
)


def ozon_error(status: int, code: str, message: str, details: str | None = None) -> Response:
    """An error in Ozon's shape: ``{"error": {"code", "message", "details"}}``."""
    body = {"error": {"code": code, "message": message, "details": details}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _utc_now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PushProblem(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_push(push: Any) -> str:
    """The push's ``message_type``; :class:`PushProblem` naming the field when it is unusable."""
    if type(push) is not dict:
        raise PushProblem(UNKNOWN, "the notification is not a JSON object")
    message_type = push.get("message_type")
    if not isinstance(message_type, str) or not message_type:
        raise PushProblem(MISSED, "message_type is missing")
    if message_type not in KEPT_PUSH_TYPES:
        return message_type
    for key in _REQUIRED[message_type]:
        value = push.get(key)
        if value is None or value == "" or not isinstance(value, str | int):
            raise PushProblem(MISSED, f"{message_type}: {key} is missing")
    for key in _TIME_FIELDS:
        value = push.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise PushProblem(UNKNOWN, f"{message_type}: {key} {value!r} is not a timestamp")
        if read_moment(value) is None:
            raise PushProblem(UNKNOWN, f"{message_type}: {key} {value!r} is not a timestamp")
    return message_type


class PushMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "cancel_risk_pushes",
            "Ozon push notifications by type and outcome "
            "(stored, duplicate, ignored, ping, refused, unavailable).",
            ["message_type", "outcome"],
            registry=registry,
        )


class _Access:
    """The push endpoint's secret and source-network checks."""

    def __init__(self, settings: LiveSettings) -> None:
        secret = settings.push_secret
        self.secret = None if secret is None else secret.get_secret_value().encode()
        self.nets = [ipaddress.ip_network(net, strict=False) for net in settings.push_allowed_nets]
        self.trust_forwarded_for = settings.trust_forwarded_for

    def refusal(self, request: Request, path_secret: str | None) -> Response | None:
        if self.nets:
            address = self._client_address(request)
            if address is None or not any(address in net for net in self.nets):
                return ozon_error(403, UNKNOWN, "the source address is not allowed to push")
        if self.secret is not None:
            given = path_secret if path_secret is not None else request.headers.get("x-push-secret")
            if given is None or not hmac.compare_digest(given.encode(), self.secret):
                return ozon_error(403, UNKNOWN, "the push secret is missing or wrong")
        return None

    def _client_address(self, request: Request) -> Any:
        host = request.client.host if request.client is not None else None
        if self.trust_forwarded_for:
            # Every line of the header: a proxy may add one instead of appending to the client's.
            forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
            if forwarded:
                # The last entry, the one our proxy added: those before it are the client's own.
                host = forwarded.split(",")[-1].strip()
        try:
            return ipaddress.ip_address(host) if host else None
        except ValueError:
            return None


def build_push_router(
    settings: LiveSettings,
    writer: Callable[[], BookWriter],
    metrics: PushMetrics,
    now_ns: Callable[[], int],
) -> APIRouter:
    """The push route at ``settings.push_path`` (and ``<path>/<secret>`` when a secret is set)."""
    router = APIRouter(tags=["live"])
    access = _Access(settings)

    async def handle(request: Request, path_secret: str | None) -> Response:
        started_text = _utc_now_text()
        refusal = access.refusal(request, path_secret)
        if refusal is not None:
            metrics.pushes.labels("", "refused").inc()
            return refusal
        body = await request.body()
        try:
            push = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            metrics.pushes.labels("", "refused").inc()
            return ozon_error(400, UNKNOWN, f"the body is not valid JSON: {exc}")
        try:
            message_type = check_push(push)
        except PushProblem as problem:
            logger.warning("push refused: %s", problem)
            metrics.pushes.labels("", "refused").inc()
            return ozon_error(400, problem.code, str(problem))
        if message_type == PING:
            metrics.pushes.labels(PING, "ping").inc()
            answer = {"version": app_version(), "name": APP_NAME, "time": started_text}
            return Response(orjson.dumps(answer), media_type="application/json")
        if message_type not in KEPT_PUSH_TYPES:
            metrics.pushes.labels("other", "ignored").inc()
            return Response(_OK, media_type="application/json")
        received_at = now_ns()

        def store(connection: Any) -> tuple[Any, list[int]]:
            accepted = accept_push(connection, push, received_at)
            return accepted, [] if accepted.at is None else [accepted.at]

        try:
            accepted = await writer().submit(store)
        except Exception as exc:
            logger.error("push not stored (%s): answering 503", type(exc).__name__)
            metrics.pushes.labels(message_type, "unavailable").inc()
            return ozon_error(
                503, UNKNOWN, "the order book is unavailable; the notification was not stored"
            )
        metrics.pushes.labels(message_type, "stored" if accepted.stored else "duplicate").inc()
        return Response(_OK, media_type="application/json")

    async def receive(request: Request) -> Response:
        return await handle(request, None)

    async def receive_with_secret(request: Request, secret: str) -> Response:
        return await handle(request, secret)

    path = settings.push_path.rstrip("/") or "/"
    summary = "Receive one of Ozon's push notifications (see live.push)."
    router.add_api_route(path, receive, methods=["POST"], summary=summary, response_model=None)
    if settings.push_secret is not None:
        router.add_api_route(
            f"{path}/{{secret}}",
            receive_with_secret,
            methods=["POST"],
            summary=summary,
            response_model=None,
        )
    return router


@functools.cache
def app_version() -> str:
    """The installed package's version (what ``TYPE_PING`` answers as ``version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(APP_NAME)
    except PackageNotFoundError:
        return "0"
