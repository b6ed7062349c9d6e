"""What the seller dashboard reads from the book: pages of open orders, one order, the causes.

The open-orders page filters and sorts on columns of ``book_postings`` kept for it (order time,
carrier, region, payment from the posting object; decision, first reason and expected saving
from the latest score), so a page of a shop with 100,000 open orders is one indexed query plus
the explanations of the rows shown. The cause analysis is computed by the worker after a sweep
(:func:`write_cause_analysis`) and read back here: the server, which answers Ozon's pushes,
never runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pandas as pd
from sqlalchemy import Connection, and_, func, select

from live import schema
from live.book import (
    ScoreInputs,
    iter_records,
    latest_explanations,
    posting_view,
    read_meta,
    score_inputs,
    write_meta,
)
from serving.scoring import ModelScorer, PostingWhatIf, ScoreJob, posting_currency
from serving.validation import RequestRejected

if TYPE_CHECKING:
    from core.model import RiskModel

SORTS = ("risk", "saving", "age", "posting")
LEVELS = ("high", "medium", "low")
PAGE_SIZE = 50
_DAY_NS = 86_400 * 1_000_000_000
MAX_AGE_DAYS = 36_525.0
CAUSES_META_KEY = "cause_analysis"


@dataclass(frozen=True)
class OrderQuery:
    """A page of the open orders: filters (None: any), the sort and the page (1-based)."""

    risk: str | None = None
    carrier: str | None = None
    region: str | None = None
    decision: str | None = None
    min_age_days: float | None = None
    sort: str = "risk"
    descending: bool = True
    page: int = 1
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, not {self.sort!r}")
        if self.risk is not None and self.risk not in LEVELS:
            raise ValueError(f"risk must be one of {LEVELS}, not {self.risk!r}")
        if self.page < 1 or self.page_size < 1:
            raise ValueError("page and page_size start at 1")


@dataclass(frozen=True)
class OrdersPage:
    rows: list[dict[str, Any]]
    total: int  # open orders matching the filters
    counts: dict[str, int]  # open orders per risk level (other filters applied), "unscored"
    options: dict[str, list[str]]  # the values the carrier, region, decision filters offer
    query: OrderQuery

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.page_size))


def _filters(query: OrderQuery, now: int, *, with_risk: bool) -> list[Any]:
    table = schema.postings
    where: list[Any] = [table.c.is_open]
    if with_risk and query.risk is not None:
        where.append(table.c.risk_level == query.risk)
    for column, value in (
        (table.c.carrier, query.carrier),
        (table.c.region, query.region),
        (table.c.decision, query.decision),
    ):
        if value is not None:
            where.append(column == value)
    if query.min_age_days is not None:
        # Ages beyond a century select nothing more, and keep the cut-off within 64 bits.
        days = min(query.min_age_days, MAX_AGE_DAYS)
        where.append(table.c.ordered_at <= now - int(days * _DAY_NS))
    return where


def _order_by(query: OrderQuery) -> list[Any]:
    table = schema.postings
    column = {
        "risk": table.c.probability,
        "saving": table.c.expected_saving,
        # Older first when descending: the age grows as the order time goes back.
        "age": table.c.ordered_at,
        "posting": table.c.posting_number,
    }[query.sort]
    descending = query.descending != (query.sort == "age")
    ordered = column.desc() if descending else column.asc()
    # Unknown values last, whatever the direction; the column's index serves the sort.
    return [ordered.nulls_last(), table.c.posting_number]


# What a row of the page shows (not the posting object: it is not shown, and it is large).
_PAGE_COLUMNS = (
    "posting_number",
    "probability",
    "risk_level",
    "carrier",
    "region",
    "payment",
    "decision",
    "expected_saving",
    "ordered_at",
    "pending",
    "note",
    "score_id",
)


def orders_page(
    connection: Connection, query: OrderQuery, now: int, lang: str, *, with_options: bool = True
) -> OrdersPage:
    """One page of the open orders, their counts per level and (``with_options``) the filters'
    choices, which a refresh of the table does not need."""
    table = schema.postings
    where = _filters(query, now, with_risk=True)
    rows = list(
        connection.execute(
            select(*(table.c[name] for name in _PAGE_COLUMNS))
            .where(and_(*where))
            .order_by(*_order_by(query))
            .limit(query.page_size)
            .offset((query.page - 1) * query.page_size)
        )
    )
    total = int(
        connection.execute(select(func.count()).select_from(table).where(and_(*where))).scalar_one()
    )
    counts = dict.fromkeys((*LEVELS, "unscored"), 0)
    for row in connection.execute(
        select(table.c.risk_level, func.count().label("n"))
        .where(and_(*_filters(query, now, with_risk=False)))
        .group_by(table.c.risk_level)
    ):
        counts[row.risk_level or "unscored"] = int(row.n)
    options: dict[str, list[str]] = {"carrier": [], "region": [], "decision": []}
    if with_options:
        for name in options:
            column = table.c[name]
            options[name] = [
                value
                for (value,) in connection.execute(
                    select(column).where(table.c.is_open, column.is_not(None)).distinct()
                )
            ]
    explanations = latest_explanations(connection, [row.score_id for row in rows], lang)
    return OrdersPage(
        [_order_row(row, explanations.get(row.score_id), now) for row in rows],
        total,
        counts,
        {name: sorted(values) for name, values in options.items()},
        query,
    )


def _order_row(row: Any, explanation: Mapping[str, Any] | None, now: int) -> dict[str, Any]:
    reasons = (explanation or {}).get("reasons") or []
    actions = (explanation or {}).get("actions") or []
    return {
        "posting_number": row.posting_number,
        "probability": row.probability,
        "risk_level": row.risk_level,
        "carrier": row.carrier,
        "region": row.region,
        "payment": row.payment,
        "decision": row.decision,
        "expected_saving": row.expected_saving,
        "age_days": None if row.ordered_at is None else (now - row.ordered_at) / _DAY_NS,
        "first_reason": reasons[0] if reasons else None,
        "first_action": actions[0] if actions else None,
        "pending": row.pending,
        "note": row.note,
    }


# --- the cause analysis -------------------------------------------------------------------------


def write_cause_analysis(connection: Connection, analysis: Mapping[str, Any]) -> None:
    """Keep the latest cause analysis (JSON-ready) for the dashboard."""
    write_meta(connection, CAUSES_META_KEY, orjson.dumps(analysis).decode())


def read_cause_analysis(connection: Connection) -> dict[str, Any] | None:
    held = read_meta(connection, CAUSES_META_KEY)
    return None if held is None else orjson.loads(held)


def build_book_cause_analysis(
    connection: Connection, model: RiskModel, as_of: int, model_version: str | None
) -> dict[str, Any]:
    """The cause analysis (:func:`training.report.build_cause_analysis`) of everything the book
    holds, known at ``as_of``, JSON-ready: the risk of the open orders by cause (codes: the page
    words them in its language) and the buyer-cancellation rates by dimension."""
    from core.ingest import tables_from_objects
    from training.report import build_cause_analysis

    tables = tables_from_objects(
        iter_records(connection, schema.postings),
        iter_records(connection, schema.pushes),
        iter_records(connection, schema.prices),
        iter_records(connection, schema.scans),
        source="book",
    )
    analysis = build_cause_analysis(tables, pd.Timestamp(as_of, unit="ns", tz="UTC"), model)
    return {
        "as_of": as_of,
        "model_version": model_version,
        "moments": analysis.moments,
        "labelled_postings": analysis.labelled_postings,
        "open_orders": len(analysis.open_orders),
        "risk_by_cause": [
            {"cause": row.cause, "risk_share": row.risk_share, "orders": row.orders}
            for row in analysis.risk_by_cause.itertuples()
        ],
        "rates": {
            name: [
                {"bucket": row.bucket, "rate": row.buyer_cancel_rate, "postings": row.postings}
                for row in table.itertuples()
            ]
            for name, table in analysis.rates.items()
        },
    }


# --- one order ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderDetail:
    """What the order page shows: the book's view, the timeline's records and the what-if."""

    view: dict[str, Any]
    inputs: ScoreInputs
    as_of: int  # the moment of the latest score (the book's clock when not scored yet)
    what_if: PostingWhatIf | None
    what_if_error: str | None


def scoring_moment(connection: Connection, number: str, now: int) -> int:
    """The moment of a posting's latest score (``now`` when it has none): what its page and
    its what-if are computed at, so that "risk now" is the risk the seller reads."""
    table = schema.postings
    scored_as_of = connection.execute(
        select(table.c.scored_as_of).where(table.c.posting_number == number)
    ).scalar_one_or_none()
    return now if scored_as_of is None else int(scored_as_of)


def posting_what_if(
    scorer: ModelScorer, inputs: ScoreInputs, as_of: int, lang: str
) -> PostingWhatIf:
    """The risk after each action for a posting as the book holds it, at ``as_of``: what
    ``POST /v1/whatif`` answers for a request carrying the same records and ``as_of``.
    :class:`serving.validation.RequestRejected` when the posting cannot be scored then."""
    job = ScoreJob(inputs.posting, inputs.pushes, inputs.prices, inputs.tracking, as_of, lang)
    where = ("book", str(inputs.posting.get("posting_number")))
    prepared = scorer.prepare_fast(job, as_of, where) or scorer.prepare_reference(job, as_of, where)
    (found,) = scorer.what_if([prepared], [posting_currency(inputs.posting)])
    return found


def book_what_if(
    connection: Connection, scorer: ModelScorer, number: str, now: int, lang: str
) -> PostingWhatIf | None:
    """:func:`posting_what_if` of a posting of the book at its :func:`scoring_moment`; None
    when the book does not hold it."""
    inputs = score_inputs(connection, [number]).get(number)
    if inputs is None:
        return None
    return posting_what_if(scorer, inputs, scoring_moment(connection, number, now), lang)


def order_detail(
    connection: Connection,
    number: str,
    scorer: ModelScorer | None,
    now: int,
    lang: str,
) -> OrderDetail | None:
    """One order's page data; None when the book does not hold it."""
    view = posting_view(connection, number, lang)
    if view is None:
        return None
    inputs = score_inputs(connection, [number])[number]
    as_of = scoring_moment(connection, number, now)
    found: PostingWhatIf | None = None
    error: str | None = None
    if scorer is None:
        error = "no model is loaded"
    elif not view["open"]:
        error = "the order is closed"
    else:
        try:
            found = posting_what_if(scorer, inputs, as_of, lang)
        except RequestRejected as exc:
            error = exc.errors[0].msg
    return OrderDetail(view, inputs, as_of, found, error)
