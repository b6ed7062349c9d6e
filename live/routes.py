"""The live book's routes besides Ozon's push: the seller's other records in, scores out.

In (scoring or admin key), each committed before the answer like a push:

- ``POST /v1/postings``: Seller API posting objects as the seller's poller gets them from
  ``/v3/posting/fbs/list`` (``{"postings": [...]}``, or the API's reply as it is:
  ``{"result": {"postings": [...]}}``, a v4 list, a get reply);
- ``POST /v1/events/prices``: price-log rows ``{"rows": [{offer_id, at, price, old_price?,
  currency_code?}]}``, the contract's ``prices.csv``;
- ``POST /v1/events/tracking``: carrier scans ``{"rows": [{posting_number, at, status,
  location?}]}``, the contract's ``tracking.csv``.

Each record is checked by the ingestion's own rules (:func:`core.ingest.tables_from_objects`):
an unusable one is listed in ``rejected`` with its index and the ingestion's reason, and every
usable one next to it is stored. A record the book already holds counts as ``duplicates``.

Out (scoring key): ``GET /v1/postings/{posting_number}`` (state, latest score with reasons and
actions, risk history), ``GET /v1/postings/{posting_number}/whatif`` (the risk after each action
at the moment of that score: ``POST /v1/whatif``'s answer on the book's records),
``GET /v1/postings`` (open postings, ``?risk=high``, keyset pages), ``GET /v1/live/status``;
``POST /v1/live/sweep`` (admin) asks the worker to re-score every open posting now.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from core.ingest import tables_from_objects
from core.ingest.history import build_reply_postings
from live.book import (
    accept_posting,
    accept_price,
    accept_scan,
    book_status,
    channel_health,
    list_postings,
    order_time,
    posting_view,
    request_sweep,
)
from live.dashboard import book_what_if
from live.writer import BookWriter
from serving.request_lane import NotCanonical, parse_posting, price_row_values, scan_row_values
from serving.routes import model_ref, what_if_response
from serving.schemas import WhatIfResponse
from serving.security import AdminKeyDep, ScoringKeyDep
from serving.state import ModelDep

Lang = Literal["en", "zh", "ru"]
_MAX_RECORDS = 5000


def _refuse(message: str) -> HTTPException:
    return HTTPException(
        status_code=422, detail=[{"loc": ["body"], "msg": message, "type": "value_error"}]
    )


async def _json_body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise _refuse(f"the body is not valid JSON: {exc}") from None


def _rows(body: Any) -> list[Any]:
    rows = body.get("rows") if type(body) is dict else None
    if type(rows) is not list:
        raise _refuse('the body must be {"rows": [...]}')
    if len(rows) > _MAX_RECORDS:
        raise _refuse(f"at most {_MAX_RECORDS} rows per request, not {len(rows)}")
    return rows


_CANONICAL_CHECKS: dict[str, Callable[[Any], Any]] = {
    "postings": parse_posting,
    "prices": price_row_values,
    "tracking": scan_row_values,
}


def _ingestion_rejects(kind: str, records: Sequence[Any]) -> dict[int, str]:
    """The ingestion's rejects of ``records`` (1-based ``line`` = position), by 0-based index."""
    if kind == "postings":
        tables = tables_from_objects(records)
    elif kind == "prices":
        tables = tables_from_objects((), prices=records)
    else:
        tables = tables_from_objects((), tracking=records)
    found: dict[int, str] = {}
    for line, reason in zip(tables.rejects["line"], tables.rejects["reason"], strict=True):
        found.setdefault(int(line) - 1, str(reason))
    return found


def checked(kind: str, records: Sequence[Any]) -> tuple[list[int], list[dict[str, Any]]]:
    """The indices of usable records, and the rejected ones with the ingestion's reasons.

    A record in the canonical form the request lane reads (:mod:`serving.request_lane`) is one
    the ingestion keeps; the others (a rare few) go through the ingestion itself, which keeps
    or rejects them and says why.
    """
    check = _CANONICAL_CHECKS[kind]
    others: list[int] = []
    for i, record in enumerate(records):
        try:
            check(record)
        except NotCanonical:
            others.append(i)
    rejects: dict[int, str] = {}
    if others:
        found = _ingestion_rejects(kind, [records[i] for i in others])
        rejects = {others[k]: reason for k, reason in found.items()}
        if kind == "postings":
            # Without a posting number a record cannot be keyed, whatever else it holds.
            for i in others:
                record = records[i]
                if type(record) is not dict or not record.get("posting_number"):
                    rejects.setdefault(i, "not a posting object with a posting_number")
    usable = [i for i in range(len(records)) if i not in rejects]
    return usable, [{"index": i, "reason": reason} for i, reason in sorted(rejects.items())]


def build_live_router(
    writer: Callable[[], BookWriter],
    engine: Callable[[], Engine],
    now_ns: Callable[[], int],
    channel_names: Sequence[str],
) -> APIRouter:
    router = APIRouter(tags=["live"])

    async def store(kind: str, records: list[Any]) -> JSONResponse:
        usable, rejected = await run_in_threadpool(checked, kind, records)
        received_at = now_ns()
        accept = {"postings": accept_posting, "prices": accept_price, "tracking": accept_scan}[kind]

        def operation(connection: Any) -> tuple[Any, list[int]]:
            outcomes = [accept(connection, records[i], received_at) for i in usable]
            if kind == "postings":  # an order's time is a record time too (the book's clock)
                times = [order_time(records[i]) for i in usable]
                return outcomes, [at for at in times if at is not None]
            return outcomes, [o.at for o in outcomes if o.at is not None]

        try:
            outcomes = await writer().submit(operation)
        except Exception as exc:
            raise HTTPException(
                status_code=503,
                detail=f"the order book is unavailable ({type(exc).__name__}); nothing was stored",
            ) from None
        if kind == "postings":
            stored = sum(outcome != "kept" for outcome in outcomes)
        else:
            stored = sum(outcome.stored for outcome in outcomes)
        return JSONResponse(
            {"stored": stored, "duplicates": len(usable) - stored, "rejected": rejected}
        )

    @router.post("/v1/postings", summary="Store Seller API posting objects in the live book.")
    async def post_postings(request: Request, _: ScoringKeyDep) -> JSONResponse:
        found = build_reply_postings(await _json_body(request))
        if isinstance(found, str):
            raise _refuse(found)
        postings = list(found[0])
        if len(postings) > _MAX_RECORDS:
            raise _refuse(f"at most {_MAX_RECORDS} postings per request, not {len(postings)}")
        return await store("postings", postings)

    @router.post("/v1/events/prices", summary="Store price-log rows in the live book.")
    async def post_prices(request: Request, _: ScoringKeyDep) -> JSONResponse:
        return await store("prices", _rows(await _json_body(request)))

    @router.post("/v1/events/tracking", summary="Store carrier scans in the live book.")
    async def post_tracking(request: Request, _: ScoringKeyDep) -> JSONResponse:
        return await store("tracking", _rows(await _json_body(request)))

    def read(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with engine().connect() as connection:
            return function(connection, *args, **kwargs)

    @router.get("/v1/postings/{posting_number}", summary="A posting's risk, reasons and history.")
    async def get_posting(posting_number: str, _: ScoringKeyDep, lang: Lang = "en") -> JSONResponse:
        view = await run_in_threadpool(read, posting_view, posting_number, lang)
        if view is None:
            raise HTTPException(status_code=404, detail=f"{posting_number} is not in the book")
        return JSONResponse(view)

    @router.get(
        "/v1/postings/{posting_number}/whatif",
        response_model=WhatIfResponse,
        summary="A posting's risk after each action, at the moment of its latest score.",
    )
    async def get_posting_what_if(
        posting_number: str, _: ScoringKeyDep, loaded: ModelDep, lang: Lang = "en"
    ) -> Response:
        found = await run_in_threadpool(
            read, book_what_if, loaded.scorer, posting_number, now_ns(), lang
        )
        if found is None:
            raise HTTPException(status_code=404, detail=f"{posting_number} is not in the book")
        answer = what_if_response(found, model_ref(loaded.record))
        return Response(answer.model_dump_json(), media_type="application/json")

    @router.get("/v1/postings", summary="The book's postings, riskiest level first if asked.")
    async def get_postings(
        _: ScoringKeyDep,
        risk: Literal["low", "medium", "high"] | None = None,
        closed: bool = False,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: str | None = None,
        lang: Lang = "en",
    ) -> JSONResponse:
        listed = await run_in_threadpool(
            read,
            list_postings,
            risk=risk,
            include_closed=closed,
            limit=limit,
            after=after,
            lang=lang,
        )
        following = listed[-1]["posting_number"] if len(listed) == limit else None
        return JSONResponse({"postings": listed, "next_after": following})

    def status(connection: Any) -> dict[str, Any]:
        found = book_status(connection)
        found["channels"] = [
            {
                "channel": health.channel,
                "failing": health.failing,
                "consecutive_failures": health.consecutive_failures,
                "last_error": health.last_error,
                "unsent": health.unsent,
            }
            for health in channel_health(connection, channel_names)
        ]
        return found

    @router.get("/v1/live/status", summary="Counts of the book, its clock, the alert channels.")
    async def get_status(_: ScoringKeyDep) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(read, status))

    @router.post("/v1/live/sweep", status_code=202, summary="Re-score every open posting now.")
    async def post_sweep(_: AdminKeyDep) -> JSONResponse:
        requested_at = now_ns()

        def operation(connection: Any) -> tuple[Any, list[int]]:
            request_sweep(connection, requested_at)
            return None, []

        await writer().submit(operation)
        return JSONResponse({"requested": str(requested_at)}, status_code=202)

    return router
