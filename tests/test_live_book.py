"""The live order book on both of its engines: a SQLite file and a real PostgreSQL server.

Every test runs once per engine (``book_url``): SQLite in ``tmp_path``, PostgreSQL in a fresh
database on the session's server (``postgres_url``, ``tests/postgres.py``). What they prove:
the migrations build exactly ``live/schema.py`` and are idempotent; every record is stored
once and re-scores the open postings it concerns, and only those; the posting object kept is
the one the ingestion's merge lets win; a duplicated, shuffled burst gives the clean stream's
book; scoring, alerting, the outbox, the listings and the counts; the clock never goes back,
even under concurrent writers; an unreachable server fails fast; and a record reported
committed survives the writer being killed.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, event, inspect, select, text
from sqlalchemy.exc import OperationalError

from benchmarks.postgres import (
    PostgresUnavailable,
    create_database,
    find_postgres_bin,
    start_postgres,
)
from core.ingest.assemble import build_merged_postings
from core.ingest.batches import RECORD_SEQ
from live import schema
from live.book import (
    MIGRATIONS_DIR,
    WRITES,
    AlertRule,
    OrderBook,
    ScoreRecord,
    Unscored,
    accept_posting,
    accept_price,
    accept_push,
    accept_scan,
    advance_clock,
    book_status,
    channel_health,
    create_book_engine,
    digest_of,
    due_alerts,
    list_postings,
    mark_alert_failed,
    mark_alert_sent,
    migrate,
    pending_postings,
    read_clock,
    record_channel,
    record_scores,
    score_inputs,
    write_last_sweep,
)

NEWEST_REVISION = "0002"
VERSION_TABLE = "book_alembic_version"  # live/migrations/env.py's (it runs when imported)
T0 = 1_772_000_000 * 10**9  # 2026-02-25, UTC ns
SECOND = 10**9


@pytest.fixture(params=["sqlite", "postgresql"])
def book_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of the test's own on each engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'book.db'}"
    return create_database(request.getfixturevalue("postgres_url"))


def another_database(book_url: str) -> str:
    """A second empty database beside ``book_url``'s, on the same engine."""
    if book_url.startswith("sqlite"):
        return book_url.replace("book.db", "other.db")
    return create_database(book_url.rsplit("/", 1)[0] + "/postgres")


@pytest.fixture
def book(book_url: str) -> Iterator[OrderBook]:
    opened = OrderBook(book_url)
    yield opened
    opened.close()


# --- records ----------------------------------------------------------------------------------


def iso(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def posting(number: str, status: str = "awaiting_packaging", offers=("A",), **extra) -> dict:
    return {
        "posting_number": number,
        "status": status,
        "in_process_at": iso(T0),
        "products": [
            {"offer_id": offer, "sku": 100 + k, "quantity": 1} for k, offer in enumerate(offers)
        ],
        **extra,
    }


def state_push(number: str, at: int, state: str = "posting_transferring_to_delivery") -> dict:
    return {
        "message_type": "TYPE_STATE_CHANGED",
        "posting_number": number,
        "new_state": state,
        "changed_state_date": iso(at),
    }


def card_edit(offer: str, at: int) -> dict:
    return {"message_type": "TYPE_CREATE_OR_UPDATE_ITEM", "offer_id": offer, "changed_at": iso(at)}


def price_row(offer: str, at: int, price: float = 1000.0) -> dict:
    return {
        "offer_id": offer,
        "at": iso(at),
        "price": price,
        "old_price": 1200.0,
        "currency_code": "RUB",
    }


def scan_row(number: str, at: int, location: str = "Moscow") -> dict:
    return {"posting_number": number, "at": iso(at), "status": "in_transit", "location": location}


def explanations(reason: str = "quiet_carrier", action: str = "call_carrier") -> dict:
    return {
        "en": {"reasons": [{"code": reason, "text": "en"}], "actions": [{"code": action}]},
        "ru": {"reasons": [{"code": reason, "text": "ru"}], "actions": [{"code": action}]},
    }


def score(number: str, seq: int, probability: float, level: str, as_of: int = T0) -> ScoreRecord:
    return ScoreRecord(
        number, seq, as_of, "event", "cancel-risk", "3", probability, level, explanations()
    )


# --- reading the book back --------------------------------------------------------------------


def run(book: OrderBook, operation: Callable[[Connection], Any]) -> Any:
    with book.writes.begin() as connection:
        return operation(connection)


def pending(book: OrderBook) -> set[str]:
    return {p.posting_number for p in run(book, lambda c: pending_postings(c, 10_000))}


def posting_rows(book: OrderBook) -> dict[str, Any]:
    rows = run(book, lambda c: list(c.execute(select(schema.postings))))
    return {row.posting_number: row for row in rows}


def event_seq(book: OrderBook, number: str) -> int:
    return posting_rows(book)[number].event_seq


def stored_bodies(book: OrderBook, table: Any) -> list[str]:
    return run(book, lambda c: list(c.execute(select(table.c.body).order_by(table.c.id)).scalars()))


def settle(book: OrderBook) -> None:
    """Score every pending posting (low risk, no alerts): nothing is pending afterwards."""

    def operation(connection: Connection) -> None:
        todo = pending_postings(connection, 10_000)
        scored = [score(p.posting_number, p.event_seq, 0.05, "low") for p in todo]
        record_scores(connection, scored, [], scored_at=T0, rule=AlertRule(), channels=[])

    run(book, operation)


def close(book: OrderBook, number: str) -> None:
    seq = event_seq(book, number)
    run(
        book,
        lambda c: record_scores(
            c,
            [],
            [Unscored(number, seq, True, "delivered")],
            scored_at=T0,
            rule=AlertRule(),
            channels=[],
        ),
    )


# --- the schema -------------------------------------------------------------------------------


def test_migrated_schema_is_the_metadata(book: OrderBook) -> None:
    with book.engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "version_table": VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        assert compare_metadata(context, schema.metadata) == []
        assert context.get_current_heads() == (NEWEST_REVISION,)
        tables = set(inspect(connection).get_table_names())
    assert tables == {*schema.metadata.tables, VERSION_TABLE}


def test_a_book_of_the_first_schema_is_upgraded_with_its_postings_facets(book_url: str) -> None:
    """A book created before the dashboard's columns gets them, filled from the postings held."""
    engine = create_book_engine(book_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    body = posting(
        "1-1",
        delivery_method={"tpl_provider": "Ozon Логистика"},
        analytics_data={"region": "Москва", "payment_type_group_name": "Карты оплаты"},
    )
    try:
        with engine.execution_options(**{WRITES: True}).begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
            connection.execute(
                text(
                    "INSERT INTO book_postings (posting_number, body, progress, received_at, "
                    "is_open, event_seq, scored_seq, pending) "
                    "VALUES ('1-1', :body, 1, 0, TRUE, 1, 0, TRUE)"
                ),
                {"body": orjson.dumps(body).decode()},
            )
    finally:
        engine.dispose()
    upgraded = OrderBook(book_url)
    try:
        row = posting_rows(upgraded)["1-1"]
    finally:
        upgraded.close()
    assert (row.ordered_at, row.carrier, row.region, row.payment) == (
        T0,
        "Ozon Логистика",
        "Москва",
        "Карты оплаты",
    )
    assert row.decision is None


def test_migrating_again_changes_nothing(book: OrderBook, book_url: str) -> None:
    run(book, lambda c: accept_posting(c, posting("1-1"), T0))
    statements: list[str] = []

    def listener(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(book.engine, "before_cursor_execute", listener)
    migrate(book.engine)
    event.remove(book.engine, "before_cursor_execute", listener)
    ddl = [s for s in statements if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP"))]
    assert statements and ddl == []
    again = OrderBook(book_url)
    try:
        assert set(posting_rows(again)) == {"1-1"}
    finally:
        again.close()


OPENER = textwrap.dedent(
    """
    import sys
    from live.book import OrderBook

    print("ready", flush=True)
    sys.stdin.readline()
    OrderBook(sys.argv[1]).close()
    print("opened", flush=True)
    """
)


def test_processes_opening_a_new_book_at_once_all_succeed(book_url: str) -> None:
    """Service workers starting together: one migrates, the others wait and find it done."""
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, book_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)  # two collide every time without the migration lock
    ]
    try:
        for opener in openers:  # all imported: released together
            assert opener.stdout is not None and opener.stdout.readline() == "ready\n"
        for opener in openers:
            assert opener.stdin is not None
            opener.stdin.write("go\n")
            opener.stdin.flush()
        outcomes = [opener.communicate(timeout=60) for opener in openers]
    finally:
        for opener in openers:
            if opener.poll() is None:
                opener.kill()
                opener.wait()
    assert [(o.returncode, out) for o, (out, _) in zip(openers, outcomes, strict=True)] == [
        (0, "opened\n")
    ] * 2, [err for _, err in outcomes]
    book = OrderBook(book_url)
    try:
        versions = run(book, lambda c: list(c.execute(text(f"SELECT * FROM {VERSION_TABLE}"))))
        assert [tuple(v) for v in versions] == [(NEWEST_REVISION,)]
    finally:
        book.close()


# --- receiving --------------------------------------------------------------------------------


def test_a_push_is_stored_once_and_marks_its_open_posting(book: OrderBook) -> None:
    for number in ("1-1", "2-1", "3-1"):
        run(book, lambda c, n=number: accept_posting(c, posting(n), T0))
    settle(book)
    close(book, "3-1")
    push = state_push("1-1", T0 + 5 * SECOND)
    first = run(book, lambda c: accept_push(c, push, T0 + 6 * SECOND))
    assert first.stored and first.at == T0 + 5 * SECOND
    assert pending(book) == {"1-1"}
    seq = event_seq(book, "1-1")
    settle(book)
    again = run(book, lambda c: accept_push(c, dict(push), T0 + 60 * SECOND))
    assert not again.stored and pending(book) == set() and event_seq(book, "1-1") == seq
    [body] = stored_bodies(book, schema.pushes)
    # Kept exactly as received (it carries its own time); the digest is of the push itself.
    assert orjson.loads(body) == push
    # A push without a time of its own is dated when the book first got it.
    untimed = {
        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
        "posting_number": "2-1",
        "new_delivery_date_begin": iso(T0 + 86_400 * SECOND),
        "new_delivery_date_end": iso(T0 + 90_000 * SECOND),
    }
    dated = run(book, lambda c: accept_push(c, untimed, T0 + 7 * SECOND))
    assert dated.stored and dated.at == T0 + 7 * SECOND
    assert not run(book, lambda c: accept_push(c, dict(untimed), T0 + 70 * SECOND)).stored
    stored = [orjson.loads(b) for b in stored_bodies(book, schema.pushes)]
    assert {**untimed, "received_at": iso(T0 + 7 * SECOND)} in stored
    settle(book)
    digests = run(book, lambda c: list(c.execute(select(schema.pushes.c.digest)).scalars()))
    assert sorted(digests) == sorted([digest_of(push), digest_of(untimed)])
    # A closed posting's pushes are kept, and re-score nothing.
    assert run(book, lambda c: accept_push(c, state_push("3-1", T0), T0)).stored
    assert pending(book) == set()
    # A push of a posting the book does not hold yet marks nothing (its object will).
    assert run(book, lambda c: accept_push(c, state_push("9-1", T0), T0)).stored
    assert pending(book) == set()


def test_a_push_without_a_time_of_its_own_is_dated_by_its_arrival(book: OrderBook) -> None:
    push = {"message_type": "TYPE_DELIVERY_DATE_CHANGED", "posting_number": "1-1"}
    accepted = run(book, lambda c: accept_push(c, push, T0 + 7 * SECOND))
    assert accepted.stored and accepted.at == T0 + 7 * SECOND


def test_a_card_edit_or_price_marks_every_open_posting_of_its_offer(book: OrderBook) -> None:
    holders = {"1-1": ("A", "B"), "2-1": ("A",), "3-1": ("C",), "4-1": ("A",)}
    for number, offers in holders.items():
        run(book, lambda c, n=number, o=offers: accept_posting(c, posting(n, offers=o), T0))
    settle(book)
    close(book, "4-1")

    assert run(book, lambda c: accept_push(c, card_edit("A", T0 + SECOND), T0)).stored
    assert pending(book) == {"1-1", "2-1"}  # not 3-1 (other offer), not 4-1 (closed)
    settle(book)
    row = price_row("B", T0 + 2 * SECOND)
    accepted = run(book, lambda c: accept_price(c, row, T0 + 3 * SECOND))
    assert accepted.stored and accepted.at == T0 + 2 * SECOND
    assert pending(book) == {"1-1"}
    settle(book)
    assert not run(book, lambda c: accept_price(c, dict(row), T0 + 9 * SECOND)).stored
    assert not run(book, lambda c: accept_push(c, card_edit("A", T0 + SECOND), T0)).stored
    assert pending(book) == set()
    assert [orjson.loads(b) for b in stored_bodies(book, schema.prices)] == [row]
    # An offer nobody holds: kept, nothing marked.
    assert run(book, lambda c: accept_price(c, price_row("Z", T0), T0)).stored
    assert pending(book) == set()


def test_a_scan_is_stored_once_and_marks_its_open_posting(book: OrderBook) -> None:
    for number in ("1-1", "2-1"):
        run(book, lambda c, n=number: accept_posting(c, posting(n), T0))
    settle(book)
    close(book, "2-1")
    row = scan_row("1-1", T0 + SECOND)
    assert run(book, lambda c: accept_scan(c, row, T0)).stored
    assert pending(book) == {"1-1"}
    settle(book)
    assert not run(book, lambda c: accept_scan(c, dict(row), T0 + SECOND)).stored
    assert run(book, lambda c: accept_scan(c, scan_row("2-1", T0 + SECOND), T0)).stored
    assert pending(book) == set()
    assert run(book, book_status)["scans"] == 2


def test_accept_posting_keeps_the_most_progressed_then_the_latest(book: OrderBook) -> None:
    def accept(record: dict) -> str:
        return run(book, lambda c: accept_posting(c, record, T0))

    def held() -> dict:
        return orjson.loads(posting_rows(book)["1-1"].body)

    packaging = posting("1-1", "awaiting_packaging")
    assert accept(packaging) == "new"
    assert accept(dict(packaging)) == "kept"
    settle(book)
    assert accept(posting("1-1", "awaiting_packaging", tracking_number="T1")) == "updated"
    assert held()["tracking_number"] == "T1" and pending(book) == {"1-1"}
    assert accept(posting("1-1", "delivering")) == "updated"
    settle(book)
    assert accept(packaging) == "kept"  # less progressed than the one held
    assert held()["status"] == "delivering" and pending(book) == set()
    assert accept(posting("1-1", "driver_pickup")) == "updated"  # equal progress: the latest
    assert held()["status"] == "driver_pickup"
    assert accept(posting("1-1", "delivered", offers=("A", "B"))) == "updated"
    offers = run(
        book, lambda c: list(c.execute(select(schema.posting_offers.c.offer_id)).scalars())
    )
    assert sorted(offers) == ["A", "B"]
    # A product without an offer_id (only a SKU) is a posting like any other.
    odd = {**posting("2-1"), "products": [{"sku": 5, "quantity": 1}, "not an object"]}
    assert accept(odd) == "new"


def test_accept_posting_lets_the_ingestions_merge_winner_win(book: OrderBook) -> None:
    """Random versions of 40 postings, in one stream: the book holds, for each posting, the
    version ``core.ingest.assemble.build_merged_postings`` keeps from the same stream."""
    rng = random.Random(11)
    statuses = [
        "awaiting_packaging",
        "awaiting_deliver",
        "delivering",
        "driver_pickup",
        "delivered",
        "cancelled",
        "some_new_status",
    ]
    stream = [
        posting(f"{rng.randrange(40)}-1", rng.choice(statuses), version=seq) for seq in range(300)
    ]
    run(book, lambda c: [accept_posting(c, record, T0) for record in stream])
    frame = pd.DataFrame(
        {
            "posting_number": [r["posting_number"] for r in stream],
            "status": [r["status"] for r in stream],
            "version": [r["version"] for r in stream],
            RECORD_SEQ: range(len(stream)),
        }
    )
    items = pd.DataFrame({RECORD_SEQ: pd.Series([], dtype="int64")})
    merged, _ = build_merged_postings(frame, items)
    expected = dict(zip(merged["posting_number"], merged["version"], strict=True))
    held = {n: orjson.loads(row.body)["version"] for n, row in posting_rows(book).items()}
    assert held == expected


def _stream() -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """A shop's first postings, then the records that follow (each posting's versions more
    progressed one after the other, so the winner does not depend on the order)."""
    first = [
        ("posting", posting(f"{k}-1", offers=(f"O{k % 4}", f"O{k % 3 + 10}"))) for k in range(12)
    ]
    later: list[tuple[str, dict]] = []
    for k in range(12):
        number = f"{k}-1"
        if k % 3 == 0:
            later.append(
                (
                    "posting",
                    posting(number, "awaiting_deliver", offers=(f"O{k % 4}", f"O{k % 3 + 10}")),
                )
            )
        if k % 4 == 1:
            later.append(("push", state_push(number, T0 + k * SECOND)))
        if k % 5 == 2:
            later.append(("scan", scan_row(number, T0 + k * SECOND)))
    later += [
        ("push", card_edit("O2", T0 + 50 * SECOND)),
        ("price", price_row("O11", T0)),
        ("price", price_row("O99", T0)),
        ("scan", scan_row("7-1", T0 + SECOND, "Tver")),
    ]
    return first, later


def _accept(connection: Connection, kind: str, record: dict) -> None:
    received_at = T0 + 100 * SECOND  # a retry carries its first arrival's time here
    if kind == "posting":
        accept_posting(connection, record, received_at)
    else:
        {"push": accept_push, "price": accept_price, "scan": accept_scan}[kind](
            connection, record, received_at
        )


def _book_state(book: OrderBook) -> dict[str, Any]:
    def as_set(table: Any) -> set[str]:
        return set(stored_bodies(book, table))

    offers = run(book, lambda c: set(c.execute(select(schema.posting_offers))))
    return {
        "postings": {n: orjson.loads(row.body) for n, row in posting_rows(book).items()},
        "offers": offers,
        "pushes": as_set(schema.pushes),
        "prices": as_set(schema.prices),
        "scans": as_set(schema.scans),
        "pending": pending(book),
    }


def test_a_duplicated_shuffled_burst_gives_the_clean_streams_book(book_url: str) -> None:
    first, later = _stream()
    rng = random.Random(3)
    clean = OrderBook(book_url)
    messy = OrderBook(another_database(book_url))
    try:
        for book, records in ((clean, first), (messy, first)):
            run(book, lambda c, r=records: [_accept(c, kind, rec) for kind, rec in r])
            settle(book)
        run(clean, lambda c: [_accept(c, kind, rec) for kind, rec in later])
        burst = [*later, *rng.sample(later, len(later) // 2), *rng.sample(first, 5)]
        rng.shuffle(burst)
        run(messy, lambda c: [_accept(c, kind, dict(rec)) for kind, rec in burst])
        state = _book_state(clean)
        assert _book_state(messy) == state
        # The re-scored postings are exactly those the later records concern.
        assert state["pending"] == {
            "0-1",
            "1-1",
            "2-1",
            "3-1",
            "4-1",
            "5-1",
            "6-1",
            "7-1",
            "9-1",
            "10-1",
        }
        # Scored, then replayed once more: nothing is new, nothing is re-scored.
        settle(messy)
        run(messy, lambda c: [_accept(c, kind, dict(rec)) for kind, rec in [*first, *later]])
        assert pending(messy) == set()
        assert {k: v for k, v in _book_state(messy).items() if k != "pending"} == {
            k: v for k, v in state.items() if k != "pending"
        }
    finally:
        clean.close()
        messy.close()


# --- scoring ----------------------------------------------------------------------------------


def test_score_inputs_hold_the_postings_records_in_received_order(book: OrderBook) -> None:
    run(book, lambda c: accept_posting(c, posting("1-1", offers=("B", "A")), T0))
    run(book, lambda c: accept_posting(c, posting("2-1", offers=("C",)), T0))
    records = [
        ("push", state_push("1-1", T0 + 3 * SECOND, "second")),
        ("push", card_edit("B", T0 + SECOND)),
        ("scan", scan_row("1-1", T0 + 9 * SECOND, "Kazan")),
        ("push", state_push("1-1", T0 + SECOND, "first")),  # received later, dated earlier
        ("price", price_row("A", T0, 900.0)),
        ("push", card_edit("A", T0 + 2 * SECOND)),
        ("push", card_edit("C", T0)),
        ("price", price_row("B", T0, 500.0)),
        ("push", state_push("2-1", T0)),
        ("scan", scan_row("2-1", T0)),
        ("price", price_row("C", T0)),
        ("scan", scan_row("1-1", T0 + 2 * SECOND, "Tula")),
        ("price", price_row("A", T0 + SECOND, 950.0)),
    ]
    run(book, lambda c: [_accept(c, kind, rec) for kind, rec in records])
    run(book, lambda c: accept_posting(c, posting("1-1", "delivering", offers=("B", "A")), T0))
    inputs = run(book, lambda c: score_inputs(c, ["1-1", "8-1"]))
    assert set(inputs) == {"1-1"}
    held = inputs["1-1"]
    assert held.posting["status"] == "delivering"
    assert [p.get("new_state") or p.get("offer_id") for p in held.pushes] == [
        "second",
        "first",
        "A",
        "B",  # own pushes as received, then each offer's card edits
    ]
    assert all("received_at" not in p for p in held.pushes)  # they carry their own times
    assert [(p["offer_id"], p["price"]) for p in held.prices] == [
        ("A", 900.0),
        ("A", 950.0),
        ("B", 500.0),
    ]
    assert [s["location"] for s in held.tracking] == ["Kazan", "Tula"]


def test_record_scores_keeps_scores_and_leaves_moved_on_postings_pending(book: OrderBook) -> None:
    for number in ("1-1", "2-1", "3-1", "4-1"):
        run(book, lambda c, n=number: accept_posting(c, posting(n), T0))
    todo = {p.posting_number: p.event_seq for p in run(book, lambda c: pending_postings(c, 10))}
    # While 2-1 is being scored, a scan arrives for it.
    run(book, lambda c: accept_scan(c, scan_row("2-1", T0 + SECOND), T0))
    run(
        book,
        lambda c: record_scores(
            c,
            [
                score("1-1", todo["1-1"], 0.2, "low", T0 + SECOND),
                score("2-1", todo["2-1"], 0.3, "low"),
            ],
            [
                Unscored("3-1", todo["3-1"], True, "delivered"),
                Unscored("4-1", todo["4-1"], False, "no in_process_at"),
            ],
            scored_at=T0 + 2 * SECOND,
            rule=AlertRule(),
            channels=["log"],
        ),
    )
    rows = posting_rows(book)
    assert pending(book) == {"2-1"}
    assert rows["1-1"].probability == 0.2 and rows["1-1"].risk_level == "low"
    assert rows["1-1"].scored_as_of == T0 + SECOND and rows["1-1"].scored_seq == todo["1-1"]
    assert not rows["3-1"].is_open and not rows["3-1"].pending and rows["3-1"].note == "delivered"
    assert rows["4-1"].is_open and rows["4-1"].note == "no in_process_at"
    # A closed posting stays closed: its records are kept and re-score nothing.
    run(book, lambda c: accept_scan(c, scan_row("3-1", T0 + SECOND), T0))
    run(book, lambda c: accept_posting(c, posting("3-1", "delivered"), T0))
    assert pending(book) == {"2-1"} and not posting_rows(book)["3-1"].is_open
    # A new score replaces the latest one and keeps the history.
    seq = event_seq(book, "1-1")
    run(
        book,
        lambda c: record_scores(
            c,
            [score("1-1", seq, 0.4, "medium", T0 + 3 * SECOND)],
            [],
            scored_at=T0 + 4 * SECOND,
            rule=AlertRule(),
            channels=[],
        ),
    )
    history = run(
        book,
        lambda c: list(
            c.execute(
                select(schema.scores.c.probability)
                .where(schema.scores.c.posting_number == "1-1")
                .order_by(schema.scores.c.id)
            ).scalars()
        ),
    )
    assert history == [0.2, 0.4]
    row = posting_rows(book)["1-1"]
    assert row.probability == 0.4 and row.risk_level == "medium" and row.note is None
    latest_id = run(
        book,
        lambda c: c.execute(
            select(schema.scores.c.id).order_by(schema.scores.c.id.desc()).limit(1)
        ).scalar_one(),
    )
    assert row.score_id == latest_id


def _alerts(book: OrderBook) -> list[tuple[str, str, str]]:
    rows = run(
        book,
        lambda c: list(
            c.execute(
                select(
                    schema.alerts.c.posting_number,
                    schema.alerts.c.alert_key,
                    schema.alerts.c.channel,
                ).order_by(schema.alerts.c.id)
            )
        ),
    )
    return [tuple(row) for row in rows]


def _score_once(
    book: OrderBook,
    number: str,
    probability: float,
    level: str,
    rule: AlertRule,
    channels: list[str],
) -> list[int]:
    seq = event_seq(book, number)
    return run(
        book,
        lambda c: record_scores(
            c,
            [score(number, seq, probability, level)],
            [],
            scored_at=T0,
            rule=rule,
            channels=channels,
        ),
    )


def test_alerts_are_raised_on_entering_the_level_once_per_channel(book: OrderBook) -> None:
    run(book, lambda c: accept_posting(c, posting("1-1"), T0))
    rule, channels = AlertRule(level="high"), ["telegram", "webhook"]
    assert _score_once(book, "1-1", 0.1, "low", rule, channels) == []
    assert _score_once(book, "1-1", 0.5, "medium", rule, channels) == []
    ids = _score_once(book, "1-1", 0.8, "high", rule, channels)
    assert len(ids) == 2
    assert _alerts(book) == [("1-1", "high", "telegram"), ("1-1", "high", "webhook")]
    assert _score_once(book, "1-1", 0.9, "high", rule, channels) == []  # still high
    assert _score_once(book, "1-1", 0.5, "medium", rule, channels) == []
    assert _score_once(book, "1-1", 0.8, "high", rule, channels) == []  # raised once, ever
    assert len(_alerts(book)) == 2
    # Scored high at once: an alert, the first score being an entry.
    run(book, lambda c: accept_posting(c, posting("2-1"), T0))
    assert len(_score_once(book, "2-1", 0.9, "high", rule, ["telegram"])) == 1


def test_alerts_on_each_rise_by_step(book: OrderBook) -> None:
    run(book, lambda c: accept_posting(c, posting("1-1"), T0))
    rule, channels = AlertRule(level="medium", step=0.1), ["log"]
    assert len(_score_once(book, "1-1", 0.55, "medium", rule, channels)) == 1  # entering
    assert _score_once(book, "1-1", 0.58, "medium", rule, channels) == []  # same band
    assert len(_score_once(book, "1-1", 0.71, "high", rule, channels)) == 1  # rise into 0.7
    assert _score_once(book, "1-1", 0.65, "high", rule, channels) == []  # a fall
    assert _score_once(book, "1-1", 0.72, "high", rule, channels) == []  # 0.7 again: once
    assert len(_score_once(book, "1-1", 0.93, "high", rule, channels)) == 1
    assert [key for _, key, _ in _alerts(book)] == ["medium", "rise:0.70", "rise:0.90"]


# --- the clock --------------------------------------------------------------------------------


def test_the_clock_only_moves_forward(book: OrderBook) -> None:
    assert run(book, read_clock) is None
    for at, expected in ((T0, T0), (T0 - SECOND, T0), (T0 + SECOND, T0 + SECOND), (5, T0 + SECOND)):
        run(book, lambda c, a=at: advance_clock(c, a))
        assert run(book, read_clock) == expected
    assert run(book, book_status)["clock"] == iso(T0 + SECOND)


def _race(
    book: OrderBook,
    first: Callable[[Connection], Any],
    second: Callable[[Connection], Any],
    table: str,
) -> Any:
    """``first`` writes in an open transaction; ``second``, in another one, reads the state
    before ``first`` committed and then blocks on its write to ``table`` until ``first``
    commits. What ``second`` returned."""
    writing = threading.Event()

    def before(conn, cursor, statement, *args) -> None:
        if (
            conn is not holder
            and table in statement
            and not statement.lstrip().startswith("SELECT")
        ):
            writing.set()

    outcome: dict[str, Any] = {}

    def other() -> None:
        try:
            with book.writes.begin() as connection:
                outcome["value"] = second(connection)
        except Exception as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    holder = book.engine.connect()
    event.listen(book.engine, "before_cursor_execute", before)
    try:
        transaction = holder.begin()
        first(holder)
        thread = threading.Thread(target=other)
        thread.start()
        # SQLite: a writing transaction waits for the lock as it begins, before it reads at
        # all; PostgreSQL: it reads, then waits at its write.
        assert book.dialect == "sqlite" or writing.wait(10)
        time.sleep(0.3)  # let it block on the lock
        assert thread.is_alive(), "the second writer did not wait for the first"
        transaction.commit()
        thread.join(20)
    finally:
        event.remove(book.engine, "before_cursor_execute", before)
        holder.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def test_the_clock_never_goes_back_under_concurrent_writers(book: OrderBook) -> None:
    run(book, lambda c: advance_clock(c, T0))
    _race(
        book,
        lambda c: advance_clock(c, T0 + 20 * SECOND),
        lambda c: advance_clock(c, T0 + 10 * SECOND),
        "book_meta",
    )
    assert run(book, read_clock) == T0 + 20 * SECOND


def test_a_concurrent_less_progressed_posting_does_not_win(book: OrderBook) -> None:
    run(book, lambda c: accept_posting(c, posting("1-1", "awaiting_packaging"), T0))
    outcome = _race(
        book,
        lambda c: accept_posting(c, posting("1-1", "delivered"), T0),
        lambda c: accept_posting(c, posting("1-1", "delivering"), T0),
        "book_postings",
    )
    assert outcome == "kept"
    assert orjson.loads(posting_rows(book)["1-1"].body)["status"] == "delivered"


# --- reading ----------------------------------------------------------------------------------


def _scored_shop(book: OrderBook) -> None:
    levels = {
        "1-1": (0.9, "high"),
        "2-1": (0.1, "low"),
        "3-1": (0.8, "high"),
        "4-1": (0.5, "medium"),
        "5-1": (0.85, "high"),
        "6-1": (0.2, "low"),
    }
    for number in [*levels, "7-1"]:
        run(book, lambda c, n=number: accept_posting(c, posting(n), T0))
    run(
        book,
        lambda c: record_scores(
            c,
            [score(n, 1, p, level) for n, (p, level) in levels.items()],
            [],
            scored_at=T0,
            rule=AlertRule(),
            channels=["a", "b"],
        ),
    )
    close(book, "5-1")


def test_list_postings_pages_after_the_last_and_filters_by_risk(book: OrderBook) -> None:
    _scored_shop(book)

    def listing(**kwargs) -> list[dict]:
        options = {
            "risk": None,
            "include_closed": False,
            "limit": 100,
            "after": None,
            "lang": "en",
            **kwargs,
        }
        return run(book, lambda c: list_postings(c, **options))

    everything = [p["posting_number"] for p in listing()]
    assert everything == ["1-1", "2-1", "3-1", "4-1", "6-1", "7-1"]  # open ones, in order
    pages, after = [], None
    while page := listing(limit=4, after=after):
        pages.append([p["posting_number"] for p in page])
        after = page[-1]["posting_number"]
    assert pages == [["1-1", "2-1", "3-1", "4-1"], ["6-1", "7-1"]]
    assert [p["posting_number"] for p in listing(risk="high")] == ["1-1", "3-1"]
    assert [p["posting_number"] for p in listing(risk="high", include_closed=True)] == [
        "1-1",
        "3-1",
        "5-1",
    ]
    assert [p["posting_number"] for p in listing(risk="high", after="1-1", limit=1)] == ["3-1"]
    [first] = listing(limit=1, lang="ru")
    assert first["probability"] == 0.9 and first["risk_level"] == "high" and first["open"]
    assert first["first_reason"] == {"code": "quiet_carrier", "text": "ru"}
    assert first["first_action"] == {"code": "call_carrier"}
    assert first["as_of"] == iso(T0)
    assert listing(lang="de", limit=1)[0]["first_reason"]["text"] == "en"  # English fallback
    unscored = listing(after="6-1")[0]
    assert unscored["posting_number"] == "7-1" and unscored["probability"] is None
    assert unscored["first_reason"] is None and unscored["as_of"] is None


COUNTED = (
    "postings",
    "open",
    "pending",
    "open_by_risk",
    "pushes",
    "prices",
    "scans",
    "scores",
    "alerts",
    "alerts_unsent",
    "clock",
    "last_sweep",
)


def test_book_status_counts_the_book(book: OrderBook) -> None:
    def counts(status: dict[str, Any]) -> dict[str, Any]:
        return {key: status[key] for key in COUNTED}

    assert counts(run(book, book_status)) == {
        "postings": 0,
        "open": 0,
        "pending": 0,
        "open_by_risk": {},
        "pushes": 0,
        "prices": 0,
        "scans": 0,
        "scores": 0,
        "alerts": 0,
        "alerts_unsent": 0,
        "clock": None,
        "last_sweep": None,
    }
    _scored_shop(book)
    run(book, lambda c: accept_scan(c, scan_row("2-1", T0), T0))
    run(book, lambda c: accept_push(c, state_push("4-1", T0), T0))
    run(book, lambda c: accept_price(c, price_row("A", T0), T0))
    run(book, lambda c: advance_clock(c, T0 + SECOND))
    run(book, lambda c: write_last_sweep(c, T0))
    [first_alert, *_] = run(book, lambda c: due_alerts(c, T0))
    run(book, lambda c: mark_alert_sent(c, first_alert.id, T0))
    status = run(book, book_status)
    # Scored high: 1-1, 3-1, 5-1 (5-1 then closed), two channels each: 6 alerts, 1 sent. The
    # price of A re-scores every open posting (all hold A), 7-1 was never scored.
    assert counts(status) == {
        "postings": 7,
        "open": 6,
        "pending": 6,
        "open_by_risk": {"high": 2, "low": 2, "medium": 1},
        "pushes": 1,
        "prices": 1,
        "scans": 1,
        "scores": 6,
        "alerts": 6,
        "alerts_unsent": 5,
        "clock": iso(T0 + SECOND),
        "last_sweep": iso(T0),
    }


# --- the outbox -------------------------------------------------------------------------------


def test_due_alerts_retries_and_sends(book: OrderBook) -> None:
    _scored_shop(book)
    due = run(book, lambda c: due_alerts(c, T0))
    assert [(a.posting_number, a.channel) for a in due] == [
        ("1-1", "a"),
        ("1-1", "b"),
        ("3-1", "a"),
        ("3-1", "b"),
        ("5-1", "a"),
        ("5-1", "b"),
    ]
    alert = due[0]
    assert alert.alert_key == "high" and alert.attempts == 0 and alert.probability == 0.9
    assert alert.risk_level == "high" and alert.as_of == T0
    assert alert.explanations == explanations()
    assert run(book, lambda c: due_alerts(c, T0 - 1)) == []  # not due before it was raised
    assert len(run(book, lambda c: due_alerts(c, T0, limit=2))) == 2

    run(book, lambda c: mark_alert_failed(c, alert.id, "timeout " * 500, T0 + 60 * SECOND))
    later = run(book, lambda c: due_alerts(c, T0 + 59 * SECOND))
    assert alert.id not in {a.id for a in later} and len(later) == 5  # backing off
    retried = run(book, lambda c: due_alerts(c, T0 + 60 * SECOND))
    assert retried[-1].id == alert.id and retried[-1].attempts == 1  # oldest due first
    error = run(
        book,
        lambda c: c.execute(
            select(schema.alerts.c.last_error).where(schema.alerts.c.id == alert.id)
        ).scalar_one(),
    )
    assert len(error) == 1000
    run(book, lambda c: mark_alert_sent(c, alert.id, T0 + 61 * SECOND))
    sent = run(
        book, lambda c: c.execute(select(schema.alerts).where(schema.alerts.c.id == alert.id)).one()
    )
    assert sent.sent_at == T0 + 61 * SECOND and sent.attempts == 2 and sent.last_error is None
    assert alert.id not in {a.id for a in run(book, lambda c: due_alerts(c, T0 + 999 * SECOND))}


def test_channel_health_follows_deliveries(book: OrderBook) -> None:
    _scored_shop(book)
    health = {h.channel: h for h in run(book, lambda c: channel_health(c, ["a", "b", "c"]))}
    assert [
        (h.last_ok_at, h.consecutive_failures, h.unsent, h.failing) for h in health.values()
    ] == [(None, 0, 3, False), (None, 0, 3, False), (None, 0, 0, False)]
    run(book, lambda c: record_channel(c, "a", T0 + 1, "HTTP 502"))
    run(book, lambda c: record_channel(c, "a", T0 + 2, "x" * 5000))
    run(book, lambda c: record_channel(c, "b", T0 + 3, None))
    [a, b] = run(book, lambda c: channel_health(c, ["a", "b"]))
    assert a.failing and a.consecutive_failures == 2 and a.last_error_at == T0 + 2
    assert a.last_error == "x" * 1000 and a.last_ok_at is None
    assert not b.failing and b.last_ok_at == T0 + 3 and b.last_error is None
    run(book, lambda c: record_channel(c, "a", T0 + 4, None))
    [a] = run(book, lambda c: channel_health(c, ["a"]))
    assert not a.failing and a.last_ok_at == T0 + 4
    assert a.last_error_at == T0 + 2  # the last failure is still told
    run(book, lambda c: record_channel(c, "a", T0 + 5, "refused"))
    [a] = run(book, lambda c: channel_health(c, ["a"]))
    assert a.consecutive_failures == 1 and a.last_error == "refused"


# --- failures ---------------------------------------------------------------------------------


def test_a_port_nobody_listens_on_fails_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(OperationalError):
        OrderBook(f"postgresql://nobody@127.0.0.1:{port}/book")
    assert time.monotonic() - started < 3


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts the connection; nothing ever answers it
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(OperationalError):
            OrderBook(f"postgresql://nobody@127.0.0.1:{port}/book?connect_timeout=2")
        elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 4.5


def test_a_stopped_server_fails_the_books_operations_promptly() -> None:
    server = start_postgres()
    try:
        book = OrderBook(create_database(server.url))
        run(book, lambda c: accept_scan(c, scan_row("1-1", T0), T0))
    finally:
        server.stop()
    try:
        for operation in (
            lambda c: accept_scan(c, scan_row("1-1", T0 + 1), T0),
            book_status,
            lambda c: due_alerts(c, T0),
        ):
            started = time.monotonic()
            with pytest.raises(OperationalError):
                run(book, operation)
            assert time.monotonic() - started < 3
    finally:
        book.close()


def test_a_missing_postgresql_is_a_failure_that_names_make_test(tmp_path: Path) -> None:
    with pytest.raises(PostgresUnavailable, match="make test"):
        find_postgres_bin(tmp_path)


# --- durability -------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from live.book import OrderBook, accept_price, accept_push, accept_scan

    book = OrderBook(sys.argv[1])
    k = 0
    while True:
        with book.engine.begin() as connection:
            at = 1_772_000_000_000_000_000 + k
            push = {"message_type": "TYPE_STATE_CHANGED", "posting_number": f"{k}-1",
                    "new_state": "posting_delivering", "changed_state_date": "2026-02-25T06:13:20Z"}
            accept_push(connection, push, at)
            accept_scan(connection, {"posting_number": f"{k}-1", "at": None, "n": k}, at)
            accept_price(connection, {"offer_id": f"O{k}", "at": None, "price": k}, at)
        print(k, flush=True)  # the commit returned
        k += 1
    """
)


def test_what_a_killed_writer_reported_committed_is_in_the_book(book_url: str) -> None:
    OrderBook(book_url).close()  # migrated before the writer starts
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, book_url], stdout=subprocess.PIPE, text=True
    )
    reported: list[int] = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            reported.append(int(line))
            if len(reported) == 40:
                writer.send_signal(signal.SIGKILL)  # most likely inside the next transaction
                break
        writer.wait(10)
        reported += [int(line) for line in writer.stdout]  # printed before the kill, unread
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL and reported == list(range(len(reported)))
    book = OrderBook(book_url)
    try:
        status = run(book, book_status)
        # Every reported commit is there; at most the one in flight also made it.
        assert len(reported) <= status["scans"] <= len(reported) + 1
        assert status["pushes"] == status["prices"] == status["scans"]
        scans = {orjson.loads(b)["n"] for b in stored_bodies(book, schema.scans)}
        assert set(reported) <= scans
        if book.dialect == "sqlite":
            assert run(book, lambda c: c.execute(text("PRAGMA integrity_check")).scalar()) == "ok"
    finally:
        book.close()
