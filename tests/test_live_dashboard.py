"""The dashboard's data layer (``live/dashboard.py``) on both of the book's engines.

Every test with a book runs once per engine: SQLite in ``tmp_path`` and a fresh database on the
session's PostgreSQL server (``postgres_url``). What they prove: the columns the open-orders
page filters and sorts by are filled from the posting object (``accept_posting``) and from the
English explanation of the latest score (``record_scores``), odd values giving None; a page
filters, sorts, pages and counts exactly, never shows a closed posting, and words its rows in
the asked language; the cause analysis is kept and read back; and, with a real model on a book
filled from a simulated shop's history, the order page's what-if is the scorer's what-if of
the records the book holds, at the moment of the posting's latest score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Connection, select

from benchmarks.postgres import create_database
from cancel_risk.examples import latest_moment, load_history_records, open_score_requests
from core.counterfactuals import CAUSES
from core.model import RiskModel
from live import schema
from live.book import (
    AlertRule,
    OrderBook,
    ScoreRecord,
    Unscored,
    accept_posting,
    accept_price,
    accept_push,
    accept_scan,
    order_time,
    posting_facets,
    push_time,
    read_moment,
    record_scores,
    score_inputs,
)
from live.dashboard import (
    LEVELS,
    PAGE_SIZE,
    SORTS,
    OrderQuery,
    book_what_if,
    build_book_cause_analysis,
    order_detail,
    orders_page,
    read_cause_analysis,
    scoring_moment,
    write_cause_analysis,
)
from serving.scoring import ModelScorer, ScoreJob, posting_currency

T0 = 1_772_000_000 * 10**9  # 2026-02-25T06:13:20Z, UTC ns: the dashboard's "now" in these tests
DAY = 86_400 * 10**9
WINDOW_DAYS = 10  # of the simulated history the book is filled with (the last ones)


# --- the book -----------------------------------------------------------------------------------


ENGINES = ["sqlite", "postgresql"]


def empty_database(request: pytest.FixtureRequest, directory: Path) -> str:
    """An empty database on the engine of ``request.param``."""
    if request.param == "sqlite":
        return f"sqlite:///{directory / 'book.db'}"
    return create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=ENGINES)
def book(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OrderBook]:
    """An empty book of the test's own on each engine."""
    opened = OrderBook(empty_database(request, tmp_path))
    yield opened
    opened.close()


@pytest.fixture(scope="module", params=ENGINES)
def shared_book(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OrderBook]:
    """A book shared by the module's tests on each engine: each test writes postings of its
    own numbers there (a fresh database per test costs half a second on PostgreSQL)."""
    opened = OrderBook(empty_database(request, tmp_path_factory.mktemp("shared-book")))
    yield opened
    opened.close()


def run(book: OrderBook, operation: Callable[[Connection], Any]) -> Any:
    with book.writes.begin() as connection:
        return operation(connection)


def iso(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ns(text: str) -> int:
    return pd.Timestamp(text, tz="UTC").value


def posting(number: str, ordered_at: int | None = T0, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "posting_number": number,
        "status": "awaiting_packaging",
        "products": [{"offer_id": "A", "sku": 100, "quantity": 1}],
    }
    if ordered_at is not None:
        body["in_process_at"] = iso(ordered_at)
    body.update(extra)
    return body


def facet_row(book: OrderBook, number: str) -> dict[str, Any]:
    table = schema.postings
    row = run(
        book,
        lambda c: c.execute(
            select(
                table.c.ordered_at,
                table.c.carrier,
                table.c.region,
                table.c.payment,
                table.c.decision,
                table.c.first_reason,
                table.c.expected_saving,
            ).where(table.c.posting_number == number)
        ).one(),
    )
    return dict(row._mapping)


def explained(
    decision: str | None,
    saving: float | None,
    reasons: tuple[str, ...] = ("slow_carrier",),
    actions: tuple[str, ...] = ("call_carrier",),
    word: str = "en",
) -> dict[str, Any]:
    """An explanation as ``core.explain.explanation_to_dict`` gives it; ``word`` marks its
    language in every reason's facts."""
    return {
        "reasons": [
            {"code": code, "share": 0.5, "risk_drop": 0.1, "facts": {"lang": word}}
            for code in reasons
        ],
        "actions": [f"{action}:{word}" for action in actions],
        "decision": decision,
        "expected_saving": saving,
    }


def score_record(
    number: str,
    probability: float,
    level: str,
    explanations: dict[str, Any],
    *,
    seq: int = 1,
    as_of: int = T0,
) -> ScoreRecord:
    return ScoreRecord(
        number, seq, as_of, "event", "cancel-risk", "3", probability, level, explanations
    )


def record(book: OrderBook, scored: list[ScoreRecord], unscored: list[Unscored] = ()) -> None:
    run(
        book,
        lambda c: record_scores(
            c, scored, list(unscored), scored_at=T0, rule=AlertRule(), channels=[]
        ),
    )


# --- accept_posting: the filter columns from the posting object -----------------------------------

FACET_CASES = [
    pytest.param(
        {
            "delivery_method": {"tpl_provider": "Ural Logistics"},
            "analytics_data": {
                "tpl_provider": "Other",
                "region": "Москва",
                "payment_type_group_name": "Карты оплаты",
            },
        },
        {"carrier": "Ural Logistics", "region": "Москва", "payment": "Карты оплаты"},
        id="delivery-method-wins",
    ),
    pytest.param(
        {"analytics_data": {"tpl_provider": "Ozon Логистика", "region": "Тверь"}},
        {"carrier": "Ozon Логистика", "region": "Тверь", "payment": None},
        id="no-delivery-method",
    ),
    pytest.param(
        {
            "delivery_method": {"tpl_provider": ""},
            "analytics_data": {"tpl_provider": " Boxberry ", "region": "  Омск  "},
        },
        {"carrier": "Boxberry", "region": "Омск", "payment": None},
        id="empty-falls-back-and-trimmed",
    ),
    pytest.param(
        {"delivery_method": {"tpl_provider": "   "}, "analytics_data": {"tpl_provider": "CDEK"}},
        {"carrier": "CDEK", "region": None, "payment": None},
        id="blank-falls-back",
    ),
    pytest.param(
        {
            "delivery_method": {"tpl_provider": 1003},
            "analytics_data": {"tpl_provider": 7, "region": 77, "payment_type_group_name": 1.5},
        },
        {"carrier": None, "region": None, "payment": None},
        id="numbers",
    ),
    pytest.param(
        {
            "delivery_method": {"tpl_provider": ["x"]},
            "analytics_data": {"region": {"name": "x"}, "payment_type_group_name": True},
        },
        {"carrier": None, "region": None, "payment": None},
        id="containers-and-bools",
    ),
    pytest.param(
        {"delivery_method": "Ural Logistics", "analytics_data": ["Москва"]},
        {"carrier": None, "region": None, "payment": None},
        id="sections-not-objects",
    ),
    pytest.param(
        {"delivery_method": None, "analytics_data": None},
        {"carrier": None, "region": None, "payment": None},
        id="sections-null",
    ),
    pytest.param(
        {"delivery_method": 5, "analytics_data": "x"},
        {"carrier": None, "region": None, "payment": None},
        id="sections-scalars",
    ),
    pytest.param(
        {"analytics_data": {"region": "", "payment_type_group_name": ""}},
        {"carrier": None, "region": None, "payment": None},
        id="empty-strings",
    ),
]


@pytest.mark.parametrize(("sections", "expected"), FACET_CASES)
def test_accept_posting_fills_the_filter_columns(shared_book, request, sections, expected):
    number = f"F-1-{request.node.callspec.id}"
    body = posting(number, T0 - 2 * DAY, **sections)
    assert run(shared_book, lambda c: accept_posting(c, body, T0)) == "new"
    assert facet_row(shared_book, number) == {
        "ordered_at": T0 - 2 * DAY,
        **expected,
        "decision": None,
        "first_reason": None,
        "expected_saving": None,
    }
    assert posting_facets(body) == {"ordered_at": T0 - 2 * DAY, **expected}


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        pytest.param(
            {"in_process_at": "2026-02-25T10:11:12Z"}, ns("2026-02-25T10:11:12"), id="iso"
        ),
        pytest.param(
            {"in_process_at": "2026-02-25T10:11:12.500000Z"},
            ns("2026-02-25T10:11:12") + 500_000_000,
            id="iso-microseconds",
        ),
        pytest.param({"created_at": iso(T0)}, T0, id="fbo-created-at"),
        pytest.param({"in_process_at": "", "created_at": iso(T0)}, T0, id="empty-then-fbo"),
        pytest.param({"in_process_at": "yesterday"}, None, id="not-a-time"),
        pytest.param({"in_process_at": 1_772_000_000}, None, id="a-number"),
        pytest.param({"in_process_at": None}, None, id="null"),
        pytest.param({}, None, id="absent"),
    ],
)
def test_accept_posting_reads_the_order_time(shared_book, request, times, expected):
    number = f"F-2-{request.node.callspec.id}"
    body = posting(number, None, **times)
    run(shared_book, lambda c: accept_posting(c, body, T0))
    assert facet_row(shared_book, number)["ordered_at"] == expected
    assert order_time(body) == expected


def test_an_order_time_the_ingestion_reads_is_the_pages_order_time(shared_book):
    """A posting object's time without ``T``/``Z`` is read by the ingestion (the model scores
    the posting with that order time): the page's age must be that same time."""
    from core.ingest import tables_from_objects

    body = posting("F-4", None, in_process_at="2026-02-25 10:00:00")
    body["products"][0]["price"] = "10.0"
    ingested = tables_from_objects([body], source="test").postings["ordered_at"].iloc[0]
    assert ingested == pd.Timestamp("2026-02-25T10:00:00", tz="UTC")
    run(shared_book, lambda c: accept_posting(c, body, T0))
    assert facet_row(shared_book, "F-4")["ordered_at"] == ingested.value


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        pytest.param("Ю" * 300, {None, "Ю" * 256, "Ю" * 300}, id="longer-than-the-column"),
        pytest.param("Мо\x00сква", {None, "Москва", "Мо\x00сква"}, id="nul-character"),
    ],
)
def test_an_odd_long_or_nul_text_never_fails_the_posting(shared_book, request, value, allowed):
    """The posting object's text is free text from the Seller API: the ingestion accepts it,
    so the book must store the posting on both engines (the filter column None, or the text
    made storable where the engine cannot hold it)."""
    number = f"F-5-{request.node.callspec.id}"
    body = posting(
        number,
        T0,
        delivery_method={"tpl_provider": value},
        analytics_data={"region": value, "payment_type_group_name": value},
    )
    assert run(shared_book, lambda c: accept_posting(c, body, T0)) == "new"
    row = facet_row(shared_book, number)
    assert row["carrier"] in allowed
    assert row["region"] in allowed
    assert row["payment"] in allowed


def test_a_newer_posting_object_updates_the_filter_columns(book):
    first = posting(
        "F-3",
        T0,
        analytics_data={"tpl_provider": "A", "region": "R1", "payment_type_group_name": "P1"},
    )
    later = posting(
        "F-3",
        T0,
        status="awaiting_deliver",
        delivery_method={"tpl_provider": "B"},
        analytics_data={"region": "R2", "payment_type_group_name": None},
    )
    older = {**first, "analytics_data": {"region": "R3"}}  # less progressed: kept out
    assert run(book, lambda c: accept_posting(c, first, T0)) == "new"
    assert run(book, lambda c: accept_posting(c, later, T0 + 1)) == "updated"
    assert run(book, lambda c: accept_posting(c, older, T0 + 2)) == "kept"
    assert facet_row(book, "F-3") == {
        "ordered_at": T0,
        "carrier": "B",
        "region": "R2",
        "payment": None,
        "decision": None,
        "first_reason": None,
        "expected_saving": None,
    }


# --- record_scores: the columns from the latest score ---------------------------------------------


def test_record_scores_keeps_the_english_decision_reason_and_saving(book):
    run(book, lambda c: accept_posting(c, posting("S-1"), T0))
    english = explained("hold_and_confirm", 123.5, reasons=("price_drop", "slow_carrier"))
    russian = explained("ship", 1.0, reasons=("tracking_quiet",), word="ru")
    record(book, [score_record("S-1", 0.8, "high", {"ru": russian, "en": english})])
    assert facet_row(book, "S-1") == {
        "ordered_at": T0,
        "carrier": None,
        "region": None,
        "payment": None,
        "decision": "hold_and_confirm",
        "first_reason": "price_drop",
        "expected_saving": 123.5,
    }
    # The next score replaces them all, with None where its explanation has nothing.
    record(
        book,
        [score_record("S-1", 0.1, "low", {"en": explained(None, None, reasons=())}, seq=1)],
    )
    row = facet_row(book, "S-1")
    assert (row["decision"], row["first_reason"], row["expected_saving"]) == (None, None, None)
    record(book, [score_record("S-1", 0.3, "medium", {"en": explained("ship", 0.0)})])
    row = facet_row(book, "S-1")
    assert (row["decision"], row["first_reason"], row["expected_saving"]) == (
        "ship",
        "slow_carrier",
        0.0,
    )


def test_record_scores_without_an_english_explanation_keeps_nothing(book):
    run(book, lambda c: accept_posting(c, posting("S-2"), T0))
    record(book, [score_record("S-2", 0.8, "high", {"ru": explained("ship", 5.0, word="ru")})])
    row = facet_row(book, "S-2")
    assert (row["decision"], row["first_reason"], row["expected_saving"]) == (None, None, None)


# --- orders_page ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    """A posting of the shop below, as the page should show it."""

    number: str
    ordered_days_ago: float | None
    carrier: str | None
    region: str | None
    payment: str | None
    probability: float | None = None  # None: not scored
    level: str | None = None
    decision: str | None = None
    saving: float | None = None
    closed: bool = False

    @property
    def ordered_at(self) -> int | None:
        return None if self.ordered_days_ago is None else T0 - int(self.ordered_days_ago * DAY)


SHOP = [
    Order("70001-0001-1", 10, "Alpha", "North", "card", 0.9, "high", "hold_and_confirm", 50.0),
    Order("70001-0002-1", 5, "Beta", "North", "cash", 0.6, "medium", "confirm_with_buyer", 20.0),
    Order("70001-0003-1", 1, "Alpha", "South", None, 0.1, "low", "ship", 0.0),
    Order("70001-0004-1", 3, None, "South", "card", 0.9, "high", "confirm_with_buyer", None),
    Order("70001-0005-1", 7, "Gamma", "East", "card"),  # not scored yet
    Order("70001-0006-1", None, "Beta", None, None, 0.2, "low", "ship", 20.0),
    Order("70001-0007-1", 12, "Delta", "West", "sbp", 0.95, "high", "cancel_order", 99.0, True),
    Order("70001-0008-1", 5, "Alpha", None, "cash", 0.5, "medium", "confirm_with_buyer", 10.0),
]
OPEN = [order for order in SHOP if not order.closed]
BY_NUMBER = {order.number: order for order in SHOP}


def shop_explanations(order: Order) -> dict[str, Any]:
    number = order.number
    return {
        "en": explained(
            order.decision, order.saving, reasons=(f"why-{number}",), actions=(f"do-{number}",)
        ),
        "ru": explained(
            order.decision,
            order.saving,
            reasons=(f"why-{number}",),
            actions=(f"do-{number}",),
            word="ru",
        ),
    }


def fill_shop(book: OrderBook) -> None:
    def operation(connection: Connection) -> None:
        for order in SHOP:
            sections: dict[str, Any] = {
                "analytics_data": {
                    "region": order.region,
                    "payment_type_group_name": order.payment,
                }
            }
            if order.carrier is not None:
                sections["delivery_method"] = {"tpl_provider": order.carrier}
            body = posting(order.number, order.ordered_at, **sections)
            if order.ordered_at is None:
                body["in_process_at"] = "not a time"
            accept_posting(connection, body, T0)
        scored = [
            score_record(o.number, o.probability, o.level, shop_explanations(o))
            for o in SHOP
            if o.probability is not None
        ]
        closed = [Unscored(o.number, 1, True, "cancelled") for o in SHOP if o.closed]
        record_scores(connection, scored, [], scored_at=T0, rule=AlertRule(), channels=[])
        record_scores(connection, [], closed, scored_at=T0, rule=AlertRule(), channels=[])

    run(book, operation)


@pytest.fixture(scope="module", params=ENGINES)
def shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OrderBook]:
    """The shop of :data:`SHOP` on each engine (the tests only read it)."""
    opened = OrderBook(empty_database(request, tmp_path_factory.mktemp("shop")))
    fill_shop(opened)
    yield opened
    opened.close()


def page(book: OrderBook, lang: str = "en", now: int = T0, **query: Any):
    return run(book, lambda c: orders_page(c, OrderQuery(**query), now, lang))


def numbers(found) -> list[str]:
    return [row["posting_number"] for row in found.rows]


def sort_value(order: Order, sort: str) -> Any:
    if sort == "risk":
        return order.probability
    if sort == "saving":
        return order.saving
    if sort == "age":
        return None if order.ordered_at is None else T0 - order.ordered_at
    return order.number


def expected_order(orders: list[Order], sort: str, descending: bool) -> list[str]:
    """Known values by the sort (largest first when descending), ties by posting number,
    unknown values last by posting number."""
    known = [o for o in orders if sort_value(o, sort) is not None]
    unknown = sorted(o.number for o in orders if sort_value(o, sort) is None)
    sign = -1 if descending else 1
    if sort == "posting":
        ranked = sorted(known, key=lambda o: o.number, reverse=descending)
    else:
        ranked = sorted(known, key=lambda o: (sign * sort_value(o, sort), o.number))
    return [o.number for o in ranked] + unknown


def test_the_default_page_is_every_open_order_by_risk(shop):
    found = page(shop)
    assert numbers(found) == [
        "70001-0001-1",  # 0.9, before 0004 (0.9) by posting number
        "70001-0004-1",
        "70001-0002-1",
        "70001-0008-1",
        "70001-0006-1",
        "70001-0003-1",
        "70001-0005-1",  # not scored: last
    ]
    assert found.total == 7
    assert found.pages == 1
    assert found.counts == {"high": 2, "medium": 2, "low": 2, "unscored": 1}


@pytest.mark.parametrize("descending", [True, False], ids=["desc", "asc"])
@pytest.mark.parametrize("sort", SORTS)
def test_sorts_put_unknown_values_last_with_the_posting_number_as_tie_break(shop, sort, descending):
    found = page(shop, sort=sort, descending=descending)
    assert numbers(found) == expected_order(OPEN, sort, descending)


def test_sorts_exactly(shop):
    assert numbers(page(shop, sort="saving")) == [
        "70001-0001-1",  # 50
        "70001-0002-1",  # 20, tie with 0006
        "70001-0006-1",
        "70001-0008-1",  # 10
        "70001-0003-1",  # 0
        "70001-0004-1",  # unknown saving
        "70001-0005-1",
    ]
    assert numbers(page(shop, sort="age")) == [  # oldest first
        "70001-0001-1",
        "70001-0005-1",
        "70001-0002-1",  # 5 days, tie with 0008
        "70001-0008-1",
        "70001-0004-1",
        "70001-0003-1",
        "70001-0006-1",  # unknown order time
    ]
    assert numbers(page(shop, sort="age", descending=False)) == [
        "70001-0003-1",
        "70001-0004-1",
        "70001-0002-1",
        "70001-0008-1",
        "70001-0005-1",
        "70001-0001-1",
        "70001-0006-1",
    ]
    assert numbers(page(shop, sort="risk", descending=False)) == [
        "70001-0003-1",
        "70001-0006-1",
        "70001-0008-1",
        "70001-0002-1",
        "70001-0001-1",
        "70001-0004-1",
        "70001-0005-1",
    ]


FILTERS = [
    pytest.param({"risk": "high"}, ["70001-0001-1", "70001-0004-1"], id="risk"),
    pytest.param({"risk": "low"}, ["70001-0006-1", "70001-0003-1"], id="risk-low"),
    pytest.param(
        {"carrier": "Alpha"}, ["70001-0001-1", "70001-0008-1", "70001-0003-1"], id="carrier"
    ),
    pytest.param({"carrier": "Delta"}, [], id="carrier-of-a-closed-posting"),
    pytest.param({"region": "South"}, ["70001-0004-1", "70001-0003-1"], id="region"),
    pytest.param(
        {"decision": "confirm_with_buyer"},
        ["70001-0004-1", "70001-0002-1", "70001-0008-1"],
        id="decision",
    ),
    pytest.param({"decision": "cancel_order"}, [], id="decision-of-a-closed-posting"),
    pytest.param(
        {"min_age_days": 5},
        ["70001-0001-1", "70001-0002-1", "70001-0008-1", "70001-0005-1"],
        id="age-inclusive",
    ),
    pytest.param({"min_age_days": 5.5}, ["70001-0001-1", "70001-0005-1"], id="age-fraction"),
    pytest.param({"min_age_days": 0}, None, id="age-zero"),
    pytest.param({"min_age_days": 11}, [], id="age-none-old-enough"),
    pytest.param(
        {"carrier": "Alpha", "min_age_days": 2}, ["70001-0001-1", "70001-0008-1"], id="two"
    ),
    pytest.param({"risk": "medium", "carrier": "Alpha", "region": "North"}, [], id="none-match"),
]


@pytest.mark.parametrize(("filters", "expected"), FILTERS)
def test_each_filter_restricts_exactly(shop, filters, expected):
    if expected is None:  # age 0: every open order with a known order time
        expected = [
            n for n in expected_order(OPEN, "risk", True) if BY_NUMBER[n].ordered_at is not None
        ]
    found = page(shop, **filters)
    assert numbers(found) == expected
    assert found.total == len(expected)


def test_the_age_filter_is_relative_to_now(shop):
    assert numbers(page(shop, now=T0 + 2 * DAY, min_age_days=7)) == [
        "70001-0001-1",
        "70001-0002-1",
        "70001-0008-1",
        "70001-0005-1",
    ]
    assert numbers(page(shop, now=T0 - 3 * DAY, min_age_days=2)) == [
        "70001-0001-1",
        "70001-0002-1",
        "70001-0008-1",
        "70001-0005-1",
    ]
    rows = {row["posting_number"]: row for row in page(shop, now=T0 + DAY // 2).rows}
    assert rows["70001-0001-1"]["age_days"] == 10.5
    assert rows["70001-0003-1"]["age_days"] == 1.5
    assert rows["70001-0006-1"]["age_days"] is None


def test_counts_ignore_the_risk_filter_and_honour_the_others(shop):
    assert page(shop, risk="high").counts == {"high": 2, "medium": 2, "low": 2, "unscored": 1}
    assert page(shop, risk="medium", carrier="Alpha").counts == {
        "high": 1,
        "medium": 1,
        "low": 1,
        "unscored": 0,
    }
    assert page(shop, region="East").counts == {"high": 0, "medium": 0, "low": 0, "unscored": 1}
    assert page(shop, min_age_days=5).counts == {
        "high": 1,
        "medium": 2,
        "low": 0,
        "unscored": 1,
    }
    assert page(shop, decision="cancel_order").counts == dict.fromkeys((*LEVELS, "unscored"), 0)


def test_options_are_the_open_postings_distinct_values_sorted(shop):
    expected = {
        "carrier": ["Alpha", "Beta", "Gamma"],
        "region": ["East", "North", "South"],
        "decision": ["confirm_with_buyer", "hold_and_confirm", "ship"],
    }
    assert page(shop).options == expected
    # The filters do not narrow the choices.
    assert page(shop, risk="low", carrier="Beta", region="North").options == expected


def test_paging(shop):
    everything = expected_order(OPEN, "risk", True)
    pages = [page(shop, page_size=3, page=k) for k in (1, 2, 3)]
    assert [numbers(p) for p in pages] == [everything[0:3], everything[3:6], everything[6:]]
    assert [(p.total, p.pages) for p in pages] == [(7, 3)] * 3
    beyond = page(shop, page_size=3, page=4)
    assert (beyond.rows, beyond.total, beyond.pages) == ([], 7, 3)
    assert beyond.counts == {"high": 2, "medium": 2, "low": 2, "unscored": 1}
    exact = page(shop, page_size=7)
    assert (len(exact.rows), exact.pages) == (7, 1)
    assert page(shop, page_size=1, page=7).rows[0]["posting_number"] == everything[6]
    assert page(shop, page_size=1).pages == 7
    filtered = page(shop, page_size=2, page=2, carrier="Alpha", sort="posting", descending=False)
    assert (numbers(filtered), filtered.total, filtered.pages) == (["70001-0008-1"], 3, 2)


@pytest.mark.parametrize("days", [200_000, 1e6, 1e300], ids=["200k", "1e6", "1e300"])
def test_an_age_older_than_any_order_is_an_empty_page(shop, days):
    """``/ui?age=1000000`` is a finite, non-negative age (``_query_from`` keeps it): the page
    is empty, not an error (the cut-off lies before 1970 and beyond 64 bits)."""
    found = page(shop, min_age_days=days)
    assert (found.rows, found.total) == ([], 0)
    assert found.counts == {"high": 0, "medium": 0, "low": 0, "unscored": 0}


def test_an_empty_book_has_one_empty_page(book):
    found = page(book)
    assert (found.rows, found.total, found.pages) == ([], 0, 1)
    assert found.counts == {"high": 0, "medium": 0, "low": 0, "unscored": 0}
    assert found.options == {"carrier": [], "region": [], "decision": []}


def test_closed_postings_never_appear(shop):
    closed = "70001-0007-1"
    for sort in SORTS:
        for descending in (True, False):
            assert closed not in numbers(page(shop, sort=sort, descending=descending))
    assert closed not in numbers(page(shop, risk="high", page_size=1000))
    assert page(shop, carrier="Delta").total == 0


def test_rows_carry_the_first_reason_and_action_in_the_asked_language(shop):
    number = "70001-0002-1"
    english = {row["posting_number"]: row for row in page(shop, "en").rows}[number]
    assert english == {
        "posting_number": number,
        "probability": 0.6,
        "risk_level": "medium",
        "carrier": "Beta",
        "region": "North",
        "payment": "cash",
        "decision": "confirm_with_buyer",
        "expected_saving": 20.0,
        "age_days": 5.0,
        "first_reason": {
            "code": f"why-{number}",
            "share": 0.5,
            "risk_drop": 0.1,
            "facts": {"lang": "en"},
        },
        "first_action": f"do-{number}:en",
        "pending": False,
        "note": None,
    }
    russian = {row["posting_number"]: row for row in page(shop, "ru").rows}[number]
    assert russian["first_reason"]["facts"] == {"lang": "ru"}
    assert russian["first_action"] == f"do-{number}:ru"
    chinese = {row["posting_number"]: row for row in page(shop, "zh").rows}[number]
    assert chinese == english  # no Chinese explanation: the English one
    unscored = {row["posting_number"]: row for row in page(shop, "ru").rows}["70001-0005-1"]
    assert (unscored["first_reason"], unscored["first_action"], unscored["probability"]) == (
        None,
        None,
        None,
    )
    assert unscored["pending"] is True


def test_a_row_without_reasons_or_actions(book):
    run(book, lambda c: accept_posting(c, posting("R-1"), T0))
    empty = explained("ship", 0.0, reasons=(), actions=())
    record(book, [score_record("R-1", 0.01, "low", {"en": empty, "zh": empty})])
    (row,) = page(book, "zh").rows
    assert (row["first_reason"], row["first_action"], row["decision"]) == (None, None, "ship")


# --- OrderQuery -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"sort": "price"}, id="unknown-sort"),
        pytest.param({"sort": ""}, id="empty-sort"),
        pytest.param({"risk": "critical"}, id="unknown-level"),
        pytest.param({"risk": "unscored"}, id="unscored-is-no-level"),
        pytest.param({"risk": "HIGH"}, id="level-case"),
        pytest.param({"page": 0}, id="page-0"),
        pytest.param({"page": -1}, id="page-negative"),
        pytest.param({"page_size": 0}, id="page-size-0"),
    ],
)
def test_order_query_refuses(arguments):
    with pytest.raises(ValueError):
        OrderQuery(**arguments)


def test_order_query_defaults():
    query = OrderQuery()
    assert (query.sort, query.descending, query.page, query.page_size) == (
        "risk",
        True,
        1,
        PAGE_SIZE,
    )
    assert OrderQuery(risk="high", sort="age", page=3).risk == "high"


# --- the cause analysis ---------------------------------------------------------------------------


def test_the_cause_analysis_round_trips(book):
    assert run(book, read_cause_analysis) is None
    analysis = {
        "as_of": T0,
        "model_version": "7",
        "moments": 12,
        "labelled_postings": 3,
        "open_orders": 2,
        "risk_by_cause": [{"cause": "price_drop", "risk_share": 0.25, "orders": 2}],
        "rates": {"carrier": [{"bucket": "Ural Logistics", "rate": 0.5, "postings": 4}]},
        "text": "Москва 义乌仓",
    }
    run(book, lambda c: write_cause_analysis(c, analysis))
    assert run(book, read_cause_analysis) == analysis
    newer = {**analysis, "as_of": T0 + DAY, "model_version": None, "rates": {}}
    run(book, lambda c: write_cause_analysis(c, newer))
    assert run(book, read_cause_analysis) == newer


# --- a book filled from a simulated shop, with a real model ---------------------------------------


@dataclass(frozen=True)
class HistoryBook:
    book: OrderBook
    now: int  # the latest order time: many postings are open then
    open_numbers: list[str]  # postings open at ``now`` by their own records, in the book


@pytest.fixture(scope="module")
def risk_model(tiny_model_dir: Path) -> RiskModel:
    return RiskModel.load(tiny_model_dir)


@pytest.fixture(scope="module")
def scorer(risk_model: RiskModel) -> ModelScorer:
    return ModelScorer(risk_model)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def history_book(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    simulated_history: Path,
) -> Iterator[HistoryBook]:
    """The simulated shop's last :data:`WINDOW_DAYS` days in a book (each engine), as the live
    routes store them: the postings ordered then with their pushes and scans, the card edits
    and the price rows from the one in force at the window's start; no posting scored."""
    records = load_history_records(simulated_history)
    now = latest_moment(records)
    since = now - WINDOW_DAYS * DAY
    postings = [body for body in records.postings if (order_time(body) or now) >= since]
    numbers = {str(body["posting_number"]) for body in postings}
    opened = OrderBook(empty_database(request, tmp_path_factory.mktemp("history-book")))

    def fill(connection: Connection) -> None:
        for body in postings:
            accept_posting(connection, body, now)
        for number in sorted(numbers):
            for push in records.pushes_by_posting.get(number, ()):
                accept_push(connection, push, now)
            for row in records.scans_by_posting.get(number, ()):
                accept_scan(connection, row, now)
        for held in records.edits_by_offer.values():
            for push in held:
                if (push_time(push) or now) >= since:
                    accept_push(connection, push, now)
        for rows in records.prices_by_offer.values():
            # From the row in force at the window's start on (what the features read).
            times = [read_moment(row.get("at")) for row in rows]
            start = max((at for at in times if at is not None and at <= since), default=None)
            for at, row in zip(times, rows, strict=True):
                if at is None or start is None or at >= start:
                    accept_price(connection, row, now)

    run(opened, fill)
    requests = [
        r for r in open_score_requests(records, now) if r["posting"]["posting_number"] in numbers
    ]
    yield HistoryBook(opened, now, [r["posting"]["posting_number"] for r in requests])
    opened.close()


def by_hand(scorer: ModelScorer, connection: Connection, number: str, as_of: int, lang: str):
    """The scorer's what-if of the book's records of ``number`` at ``as_of``, by the
    reference route (``tables_from_objects`` + ``build_features``)."""
    inputs = score_inputs(connection, [number])[number]
    job = ScoreJob(inputs.posting, inputs.pushes, inputs.prices, inputs.tracking, as_of, lang)
    prepared = scorer.prepare_reference(job, as_of, ("by-hand",))
    (found,) = scorer.what_if([prepared], [posting_currency(inputs.posting)])
    return found


def what_if_summary(found) -> tuple:
    return (
        found.posting_number,
        found.as_of,
        found.risk_level,
        found.currency,
        [(a.action, a.title, a.basis, a.risk_level_after, a.amount) for a in found.actions],
    )


def assert_same_what_if(found, expected) -> None:
    assert what_if_summary(found) == what_if_summary(expected)
    assert found.probability == pytest.approx(expected.probability, rel=1e-9, abs=1e-12)
    for got, wanted in zip(found.actions, expected.actions, strict=True):
        assert got.probability_before == pytest.approx(wanted.probability_before, rel=1e-9)
        assert got.probability_after == pytest.approx(wanted.probability_after, rel=1e-9)


@pytest.mark.slow
def test_the_book_holds_open_postings_to_ask_about(history_book):
    assert len(history_book.open_numbers) >= 20
    with history_book.book.engine.connect() as connection:
        held = score_inputs(connection, history_book.open_numbers[:5])
    assert sorted(held) == sorted(history_book.open_numbers[:5])
    assert all(inputs.pushes and inputs.prices for inputs in held.values())


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["en", "ru", "zh"])
def test_book_what_if_of_an_unscored_posting_is_the_scorers_at_now(history_book, scorer, lang):
    now = history_book.now
    chosen = history_book.open_numbers[:3]
    with history_book.book.engine.connect() as connection:
        for number in chosen:
            assert scoring_moment(connection, number, now) == now
            found = book_what_if(connection, scorer, number, now, lang)
            expected = by_hand(scorer, connection, number, now, lang)
            # The same route as the worker's (the request lane when it reads the records).
            inputs = score_inputs(connection, [number])[number]
            job = ScoreJob(inputs.posting, inputs.pushes, inputs.prices, inputs.tracking, now, lang)
            where = ("book", number)
            prepared = scorer.prepare_fast(job, now, where) or scorer.prepare_reference(
                job, now, where
            )
            (same_route,) = scorer.what_if([prepared], [posting_currency(inputs.posting)])
            assert found == same_route
            assert_same_what_if(found, expected)
            assert found.as_of == now
            assert found.posting_number == number
            assert found.actions  # every open posting can at least be confirmed with the buyer


@pytest.mark.slow
def test_book_what_if_of_a_scored_posting_is_at_its_scores_moment(history_book, scorer):
    now = history_book.now
    with history_book.book.engine.connect() as connection:
        number = next(
            n
            for n in history_book.open_numbers[5:]
            if order_time(score_inputs(connection, [n])[n].posting) <= now - 2 * DAY
        )
    scored_at = now - DAY  # the worker's last score, a day before the dashboard's "now"
    explanations = {"en": explained("ship", 0.0)}
    run(
        history_book.book,
        lambda c: record_scores(
            c,
            [score_record(number, 0.2, "low", explanations, as_of=scored_at)],
            [],
            scored_at=now,
            rule=AlertRule(),
            channels=[],
        ),
    )
    with history_book.book.engine.connect() as connection:
        assert scoring_moment(connection, number, now) == scored_at
        assert scoring_moment(connection, number, now + 5 * DAY) == scored_at
        found = book_what_if(connection, scorer, number, now, "ru")
        assert found is not None
        assert found.as_of == scored_at
        assert_same_what_if(found, by_hand(scorer, connection, number, scored_at, "ru"))
        detail = order_detail(connection, number, scorer, now, "ru")
        assert detail is not None
        assert (detail.as_of, detail.what_if, detail.what_if_error) == (scored_at, found, None)
        assert detail.view["score"]["probability"] == 0.2
        without_model = order_detail(connection, number, None, now, "ru")
        assert (without_model.what_if, without_model.what_if_error) == (
            None,
            "no model is loaded",
        )


@pytest.mark.slow
def test_a_posting_the_book_does_not_hold(history_book, scorer):
    now = history_book.now
    with history_book.book.engine.connect() as connection:
        assert scoring_moment(connection, "no-such-posting", now) == now
        assert book_what_if(connection, scorer, "no-such-posting", now, "en") is None
        assert order_detail(connection, "no-such-posting", scorer, now, "en") is None


def test_order_detail_of_a_closed_posting_has_no_what_if(book, scorer):
    run(book, lambda c: accept_posting(c, posting("C-1", T0 - DAY), T0))
    record(book, [], [Unscored("C-1", 1, True, "cancelled")])
    with book.engine.connect() as connection:
        detail = order_detail(connection, "C-1", scorer, T0, "en")
    assert detail is not None
    assert (detail.what_if, detail.what_if_error, detail.as_of) == (
        None,
        "the order is closed",
        T0,
    )
    assert detail.view["open"] is False


def test_order_detail_of_an_open_posting_the_scorer_refuses(book, scorer):
    run(book, lambda c: accept_posting(c, posting("C-2", T0 - DAY, products=[]), T0))
    run(book, lambda c: accept_posting(c, posting("C-3", T0 + DAY), T0))  # ordered after now
    with book.engine.connect() as connection:
        for number in ("C-2", "C-3"):
            detail = order_detail(connection, number, scorer, T0, "en")
            assert detail is not None
            assert detail.view["open"] is True
            assert detail.what_if is None
            assert isinstance(detail.what_if_error, str) and detail.what_if_error, number
            assert detail.as_of == T0


@pytest.mark.slow
def test_the_cause_analysis_of_the_book(history_book, risk_model):
    now = history_book.now
    with history_book.book.engine.connect() as connection:
        analysis = build_book_cause_analysis(connection, risk_model, now, "9")
    assert (analysis["as_of"], analysis["model_version"]) == (now, "9")
    assert sorted(row["cause"] for row in analysis["risk_by_cause"]) == sorted(CAUSES)
    for row in analysis["risk_by_cause"]:
        assert 0.0 <= row["risk_share"] <= 1.0, row
        assert isinstance(row["orders"], int) and 0 <= row["orders"] <= analysis["open_orders"]
    assert analysis["open_orders"] >= len(history_book.open_numbers) > 0
    assert analysis["labelled_postings"] > 0 and analysis["moments"] > 0
    assert analysis["rates"]
    for name, rows in analysis["rates"].items():
        assert rows, name
        for row in rows:
            assert isinstance(row["rate"], float) and math.isfinite(row["rate"]), (name, row)
            assert 0.0 <= row["rate"] <= 1.0, (name, row)
            assert isinstance(row["postings"], int) and row["postings"] > 0, (name, row)
    # JSON-ready: what the worker writes is what the page reads.
    run(history_book.book, lambda c: write_cause_analysis(c, analysis))
    with history_book.book.engine.connect() as connection:
        assert read_cause_analysis(connection) == analysis
