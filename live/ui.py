"""The seller dashboard at ``/ui``: tonight's risky orders, why, what to do, what an action changes.

Server-rendered pages (Jinja2 templates in ``live/templates``, one small script and one style
sheet in ``live/static``, no external resource): the open orders (filtered, sorted, paged, their
table refreshed in place), one order (its timeline and risk history on one axis, its reasons,
actions, decision and what-if) and the causes of the shop's cancellations. Every page works
without the script; the script only refreshes the orders table.

Authentication is the service's: an API key, checked once at the login form, then a session
cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS, expiring after
``CANCEL_RISK_UI_SESSION_HOURS``). The cookie holds no key: an id derived from the key's digest,
its expiry and an HMAC of both (:class:`Sessions`), so a key removed from the settings ends its
sessions at the next restart. The language is one of zh/ru/en, from the ``lang`` cookie, else
the browser's ``Accept-Language``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from core.explain import MIN_RISK_DROP
from core.playbook import LANGUAGES, Playbook, load_playbook, percent_text
from live.dashboard import (
    LEVELS,
    SORTS,
    OrderQuery,
    order_detail,
    orders_page,
    read_cause_analysis,
)
from live.settings import LiveSettings
from live.timeline import build_timeline, render_timeline_svg, timeline_rows
from live.ui_text import LANGUAGE_NAMES, STATUSES, bucket_label, status_label, texts
from serving.security import KeyRing
from training.report import bar_chart_svg

STATIC_DIR = Path(__file__).with_name("static")
SESSION_COOKIE = "cancel_risk_session"
LANG_COOKIE = "cancel_risk_lang"
_MAX_FORM_BYTES = 8192
_NS = 1_000_000_000

# Pages draw only from this origin: no inline script, no external resource.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("live", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# --- sessions -------------------------------------------------------------------------------------


class Sessions:
    """Signed, expiring session tokens for the holders of a valid API key."""

    def __init__(self, keys: KeyRing, secret: bytes, hours: float) -> None:
        self.keys = keys
        self.secret = secret
        self.seconds = int(hours * 3600)

    def issue(self, presented: str, now: float | None = None) -> str | None:
        """A token for ``presented`` (None when the key is not valid)."""
        key_id = self.keys.session_id(presented)
        if key_id is None:
            return None
        expires = int(now if now is not None else time.time()) + self.seconds
        payload = f"{key_id}.{expires}"
        return f"{payload}.{self._sign(payload)}"

    def valid(self, token: str | None, now: float | None = None) -> bool:
        if not token or not token.isascii() or token.count(".") != 2:
            return False
        key_id, expires, signature = token.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{key_id}.{expires}")):
            return False
        if not expires.isdigit() or int(expires) <= (now if now is not None else time.time()):
            return False
        return self.keys.knows_session_id(key_id)

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()


def session_secret(settings: LiveSettings) -> bytes:
    if settings.ui_session_secret is None:
        return secrets.token_bytes(32)
    return hashlib.sha256(settings.ui_session_secret.get_secret_value().encode()).digest()


# --- helpers --------------------------------------------------------------------------------------


def choose_language(request: Request) -> str:
    """The ``lang`` cookie, else the first of the browser's languages the pages speak."""
    chosen = request.cookies.get(LANG_COOKIE)
    if chosen in LANGUAGES:
        return chosen
    ranked = []
    for position, part in enumerate(request.headers.get("accept-language", "").split(",")):
        tag, *parameters = (piece.strip() for piece in part.split(";"))
        weight = 1.0
        for parameter in parameters:
            name, _, value = (piece.strip() for piece in parameter.partition("="))
            if name.lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = math.nan
        if not 0.0 < weight <= 1.0:  # malformed or refused (q=0): not a choice
            continue
        ranked.append((-weight, position, tag.split("-")[0].lower()))
    for *_, tag in sorted(ranked):
        if tag in LANGUAGES:
            return tag
    return "en"


def local_path(target: str | None, default: str = "/ui") -> str:
    """``target`` when it is a path of the dashboard, else ``default`` (no open redirect)."""
    if not target or not (target == "/ui" or target.startswith(("/ui/", "/ui?"))):
        return default
    if any(part in target for part in ("//", "\\", "..")):
        return default
    return target


def format_time(ns: int | None) -> str:
    if ns is None:
        return "—"
    return datetime.fromtimestamp(ns / _NS, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def percent(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return percent_text(value, decimals=1)


def _html(body: str, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _redirect(target: str) -> RedirectResponse:
    return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)


def _query_from(params: dict[str, str]) -> OrderQuery:
    """The orders page's query from its URL parameters; what is not understood is ignored."""

    def text(name: str) -> str | None:
        value = (params.get(name) or "").strip()
        return value or None

    def number(name: str, kind: Callable[[str], Any]) -> Any:
        try:
            value = kind(params.get(name) or "")
        except ValueError:
            return None
        return value if math.isfinite(value) and value >= 0 else None

    risk = text("risk")
    sort = text("sort") or "risk"
    page = number("page", int) or 1
    return OrderQuery(
        risk=risk if risk in LEVELS else None,
        carrier=text("carrier"),
        region=text("region"),
        decision=text("decision"),
        min_age_days=number("age", float),
        sort=sort if sort in SORTS else "risk",
        descending=params.get("dir") != "asc",
        page=min(page, 1_000_000),
    )


def _query_params(query: OrderQuery, **changes: Any) -> str:
    """The URL parameters of ``query`` with ``changes`` (defaults left out)."""
    values = {
        "risk": query.risk,
        "carrier": query.carrier,
        "region": query.region,
        "decision": query.decision,
        "age": None if query.min_age_days is None else repr(query.min_age_days),
        "sort": None if query.sort == "risk" else query.sort,
        "dir": None if query.descending else "asc",
        "page": None if query.page == 1 else str(query.page),
    }
    values.update(changes)
    return urlencode({k: v for k, v in values.items() if v is not None})


# --- the router -----------------------------------------------------------------------------------


def build_ui_router(
    settings: LiveSettings,
    engine: Callable[[], Engine],
    now_ns: Callable[[], int],
    playbook: Playbook | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)
    playbook = playbook or load_playbook()
    secret = session_secret(settings)

    def sessions(request: Request) -> Sessions:
        return Sessions(request.app.state.keys, secret, settings.ui_session_hours)

    def logged_in(request: Request) -> bool:
        return sessions(request).valid(request.cookies.get(SESSION_COOKIE))

    def to_login(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return _redirect("/ui/login?" + urlencode({"next": target}))

    def render(request: Request, template: str, lang: str, **context: Any) -> str:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return TEMPLATES.get_template(template).render(
            t=texts(lang),
            lang=lang,
            languages=LANGUAGE_NAMES,
            here=here,
            here_quoted=urlencode({"next": here}),
            logged_in=context.pop("logged_in", True),
            percent=percent,
            min_risk_drop=MIN_RISK_DROP,
            status_label=status_label,
            format_time=format_time,
            cause_title=lambda code: playbook.entry(code).title.get(lang),
            decision_title=lambda code: playbook.decisions[code].get(lang) if code else "—",
            value_name=lambda kind, value: playbook.value_name(kind, value, lang) if value else "—",
            **context,
        )

    def read(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with engine().connect() as connection:
            return function(connection, *args, **kwargs)

    def scorer(request: Request) -> Any:
        loaded = request.app.state.service.store.current
        return None if loaded is None else loaded.scorer

    # --- login ----------------------------------------------------------------------------

    @router.get("/login")
    async def login_form(request: Request, next: str | None = None) -> Response:
        lang = choose_language(request)
        page = render(
            request,
            "login.html",
            lang,
            logged_in=False,
            next=local_path(next),
            failed=False,
            hours=settings.ui_session_hours,
        )
        return _html(page)

    @router.post("/login")
    async def login(request: Request) -> Response:
        lang = choose_language(request)
        body = await request.body()
        form = parse_qs(body[:_MAX_FORM_BYTES].decode("utf-8", "replace"))
        key = (form.get("api_key") or [""])[0].strip()
        target = local_path((form.get("next") or [None])[0])
        token = sessions(request).issue(key)
        if token is None:
            page = render(
                request,
                "login.html",
                lang,
                logged_in=False,
                next=target,
                failed=True,
                hours=settings.ui_session_hours,
            )
            return _html(page, status_code=401)
        response = _redirect(target)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(settings.ui_session_hours * 3600),
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        response = _redirect("/ui/login")
        response.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    @router.get("/lang/{code}")
    async def set_language(request: Request, code: str, next: str | None = None) -> Response:
        response = _redirect(local_path(next))
        if code in LANGUAGES:
            response.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, path="/ui", samesite="lax")
        return response

    # --- the open orders ------------------------------------------------------------------

    def orders_context(request: Request, lang: str, *, with_options: bool) -> dict[str, Any]:
        query = _query_from(dict(request.query_params))
        now = now_ns()
        page = read(orders_page, query, now, lang, with_options=with_options)
        return {
            "page": page,
            "query": query,
            "now": now,
            "sorts": SORTS,
            "levels": LEVELS,
            "link": lambda **changes: "/ui?" + _query_params(query, **changes),
            "rows_url": "/ui/orders/rows?" + _query_params(query),
            "refresh_seconds": settings.ui_refresh_seconds,
        }

    @router.get("")
    async def orders(request: Request) -> Response:
        if not logged_in(request):
            return to_login(request)
        lang = choose_language(request)
        context = await run_in_threadpool(orders_context, request, lang, with_options=True)
        return _html(render(request, "orders.html", lang, **context))

    @router.get("/orders/rows")
    async def orders_rows(request: Request) -> Response:
        """The orders table alone, for the page's refresh (ETag: unchanged tables are 304)."""
        if not logged_in(request):
            return Response(status_code=401, headers=SECURITY_HEADERS)
        lang = choose_language(request)
        context = await run_in_threadpool(orders_context, request, lang, with_options=False)
        body = render(request, "orders_rows.html", lang, **context)
        tag = '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers={**SECURITY_HEADERS, "ETag": tag})
        return _html(body, headers={"ETag": tag})

    # --- one order ------------------------------------------------------------------------

    @router.get("/orders/{posting_number}")
    async def order(request: Request, posting_number: str) -> Response:
        if not logged_in(request):
            return to_login(request)
        lang = choose_language(request)
        t = texts(lang)

        def build() -> dict[str, Any] | None:
            detail = read(order_detail, posting_number, scorer(request), now_ns(), lang)
            if detail is None:
                return None
            timeline = build_timeline(detail.inputs, detail.as_of)
            labels = {
                "status": t["lane_status"],
                "scan": t["lane_scan"],
                "price": t["lane_price"],
                "card": t["lane_card"],
                "promise": t["lane_promise"],
                "risk": t["risk"],
                "now": t["now"],
                "promised delivery": t["promised_delivery"],
                "shipment deadline": t["shipment_deadline"],
                "vs paid": t["vs_paid"],
                "events": t["events"],
                "months": t["months"],
                **{level: t[f"level_{level}"] for level in LEVELS},
                **{code: words[lang] for code, words in STATUSES.items()},
            }
            risk = [
                (_parse_iso(h["as_of"]), h["probability"], h["risk_level"])
                for h in detail.view["history"]
            ]
            loaded = request.app.state.service.store.current
            thresholds = None if loaded is None else _thresholds(loaded.model)
            return {
                "detail": detail,
                "view": detail.view,
                "score": detail.view["score"],
                "timeline_svg": render_timeline_svg(
                    timeline,
                    risk,
                    as_of_ns=detail.as_of,
                    thresholds=thresholds,
                    labels=labels,
                    title=t["timeline"],
                ),
                "timeline_rows": timeline_rows(timeline, labels),
                "what_if": detail.what_if,
                "what_if_error": detail.what_if_error,
            }

        context = await run_in_threadpool(build)
        if context is None:
            page = render(request, "missing.html", lang, number=posting_number)
            return _html(page, status_code=404)
        return _html(render(request, "order.html", lang, **context))

    # --- the causes -----------------------------------------------------------------------

    @router.get("/causes")
    async def causes(request: Request) -> Response:
        if not logged_in(request):
            return to_login(request)
        lang = choose_language(request)
        t = texts(lang)
        analysis = await run_in_threadpool(read, read_cause_analysis)
        charts = []
        if analysis is not None:
            by_cause = analysis["risk_by_cause"]
            charts.append(
                bar_chart_svg(
                    [playbook.entry(row["cause"]).title.get(lang) for row in by_cause],
                    [row["risk_share"] for row in by_cause],
                    [row["orders"] for row in by_cause],
                    t["risk_by_cause"],
                )
            )
            for name, rows in analysis["rates"].items():
                dimension = t.get(f"dim_{name}", name)
                charts.append(
                    bar_chart_svg(
                        [bucket_label(str(row["bucket"]), lang) for row in rows],
                        [row["rate"] for row in rows],
                        [row["postings"] for row in rows],
                        t["rates_by"].format(name=dimension),
                    )
                )
        return _html(render(request, "causes.html", lang, analysis=analysis, charts=charts))

    return router


def _parse_iso(value: str) -> int:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(moment.timestamp()) * _NS + moment.microsecond * 1000


def _thresholds(model: Any) -> tuple[float, float]:
    return float(model.thresholds.medium), float(model.thresholds.high)
