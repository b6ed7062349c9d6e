"""The replay: postings as the poller saw them, the timeline, and the sender over real HTTP."""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from aiohttp import web
from typer.testing import CliRunner

from cancel_risk.cli import app
from core.ingest import load_history
from core.ingest.events import with_receipt_times
from core.ingest.postings import STATUS_PROGRESS
from core.ingest.values import parse_timestamp
from live.archive import write_archive
from live.book import (
    KEPT_PUSH_TYPES,
    OrderBook,
    accept_posting,
    accept_price,
    accept_push,
    accept_scan,
)
from live.replay import (
    EMPTY_CANCELLATION,
    END,
    POSTING,
    PRICE,
    PUSH,
    SCAN,
    STATUS_OF_STATE,
    TimedRecord,
    build_timeline,
    posting_as_polled,
    push_event_time,
    read_timeline,
    replay_history,
)
from simulator import SimulationConfig, simulate_shop, write_history

runner = CliRunner()
H = 3_600_000_000_000  # an hour in ns


def ns(text: str) -> int:
    at = parse_timestamp(text)
    assert at is not None
    return at


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("simulated") / "history"
    write_history(simulate_shop(SimulationConfig(days=20, orders_per_day=20, seed=3)), directory)
    return directory


@pytest.fixture(scope="module")
def tables(history: Path):
    return load_history(history)


# --- posting_as_polled ----------------------------------------------------------------------------

ORDERED = "2026-06-01T10:00:00Z"
SNAPSHOT: dict[str, Any] = {
    "posting_number": "100-1-1",
    "status": "cancelled",
    "in_process_at": ORDERED,
    "shipment_date": "2026-06-03T10:00:00Z",
    "delivering_date": "2026-06-02T08:00:00Z",
    "tracking_number": "OZ1CN",
    "cancellation": {
        "cancel_reason_id": 402,
        "cancel_reason": "Покупатель отменил заказ",
        "cancellation_type": "client",
        "cancelled_after_ship": True,
        "affect_cancellation_rating": False,
        "cancellation_initiator": "Клиент",
    },
    "products": [{"sku": 1, "offer_id": "A", "price": "10.000000", "quantity": 1}],
    "analytics_data": {
        "region": "Москва",
        "delivery_date_begin": "2026-06-20T00:00:00Z",
        "delivery_date_end": "2026-06-24T00:00:00Z",
    },
}


def state(new_state: str, at: str) -> dict[str, Any]:
    return {
        "message_type": "TYPE_STATE_CHANGED",
        "posting_number": "100-1-1",
        "new_state": new_state,
        "changed_state_date": at,
    }


PUSHES: list[dict[str, Any]] = [
    {"message_type": "TYPE_NEW_POSTING", "posting_number": "100-1-1", "in_process_at": ORDERED},
    state("posting_transferring_to_delivery", "2026-06-02T08:00:00Z"),
    {
        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
        "posting_number": "100-1-1",
        "old_delivery_date_begin": "2026-06-10T00:00:00Z",
        "old_delivery_date_end": "2026-06-14T00:00:00Z",
        "new_delivery_date_begin": "2026-06-15T00:00:00Z",
        "new_delivery_date_end": "2026-06-18T00:00:00Z",
        "received_at": "2026-06-04T00:00:00Z",
    },
    state("posting_on_way_to_city", "2026-06-05T00:00:00Z"),
    {
        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
        "posting_number": "100-1-1",
        "old_delivery_date_begin": "2026-06-15T00:00:00Z",
        "old_delivery_date_end": "2026-06-18T00:00:00Z",
        "new_delivery_date_begin": "2026-06-20T00:00:00Z",
        "new_delivery_date_end": "2026-06-24T00:00:00Z",
        "received_at": "2026-06-06T00:00:00Z",
    },
    {
        "message_type": "TYPE_POSTING_CANCELLED",
        "posting_number": "100-1-1",
        "old_state": "posting_on_way_to_city",
        "new_state": "posting_canceled",
        "changed_state_date": "2026-06-07T00:00:00Z",
        "reason": {"id": 402, "message": "Покупатель отменил заказ"},
    },
]


def test_at_the_order_time_the_posting_is_new_and_promised_its_first_dates():
    before = copy.deepcopy(SNAPSHOT)
    polled = posting_as_polled(SNAPSHOT, PUSHES, ns(ORDERED))
    assert before == SNAPSHOT  # the snapshot is not changed
    assert polled["status"] == "awaiting_packaging"
    assert polled["cancellation"] == EMPTY_CANCELLATION
    assert polled["delivering_date"] is None
    assert polled["analytics_data"] == {
        "region": "Москва",
        "delivery_date_begin": "2026-06-10T00:00:00Z",
        "delivery_date_end": "2026-06-14T00:00:00Z",
    }
    unchanged = {"status", "cancellation", "delivering_date", "analytics_data"}
    assert {k: v for k, v in polled.items() if k not in unchanged} == {
        k: v for k, v in SNAPSHOT.items() if k not in unchanged
    }


def test_each_push_moves_the_posting_on():
    at_handover = posting_as_polled(SNAPSHOT, PUSHES, ns("2026-06-02T08:00:00Z"))
    assert at_handover["status"] == "awaiting_deliver"
    assert at_handover["delivering_date"] == SNAPSHOT["delivering_date"]  # <= the moment
    assert at_handover["analytics_data"]["delivery_date_end"] == "2026-06-14T00:00:00Z"

    after_first_change = posting_as_polled(SNAPSHOT, PUSHES, ns("2026-06-05T00:00:00Z"))
    assert after_first_change["status"] == "delivering"
    assert after_first_change["analytics_data"]["delivery_date_begin"] == "2026-06-15T00:00:00Z"
    assert after_first_change["cancellation"] == EMPTY_CANCELLATION

    after_last_change = posting_as_polled(SNAPSHOT, PUSHES, ns("2026-06-06T12:00:00Z"))
    assert after_last_change["analytics_data"] == SNAPSHOT["analytics_data"]
    assert after_last_change["status"] == "delivering"


def test_from_the_closing_push_on_it_is_the_snapshot():
    closing = ns("2026-06-07T00:00:00Z")
    assert posting_as_polled(SNAPSHOT, PUSHES, closing) == SNAPSHOT
    assert posting_as_polled(SNAPSHOT, PUSHES, closing + H) == SNAPSHOT
    assert posting_as_polled(SNAPSHOT, PUSHES, closing - 1)["status"] == "delivering"


@pytest.mark.parametrize(
    ("new_state", "status"),
    [
        ("posting_created", "awaiting_packaging"),
        ("posting_transferring_to_delivery", "awaiting_deliver"),
        ("posting_in_carriage", "awaiting_deliver"),
        ("posting_not_in_carriage", "awaiting_deliver"),
        ("posting_on_way_to_city", "delivering"),
        ("posting_transferred_to_courier_service", "delivering"),
        ("posting_in_courier_service", "delivering"),
        ("posting_on_way_to_pickup_point", "delivering"),
        ("posting_in_pickup_point", "delivering"),
        ("posting_conditionally_delivered", "delivering"),
        ("posting_driver_pick_up", "driver_pickup"),
        ("posting_delivered", "delivered"),
        ("posting_received", "delivered"),
        ("posting_canceled", "cancelled"),
        ("posting_in_a_new_state", "posting_in_a_new_state"),  # unknown: kept as it is
    ],
)
def test_ozons_status_mapping(new_state, status):
    assert STATUS_OF_STATE.get(new_state, new_state) == status
    # A snapshot delivered by a push that is not its closing one: the mapping alone decides.
    snapshot = {**SNAPSHOT, "status": "delivered", "cancellation": None}
    pushes = [state(new_state, "2026-06-02T00:00:00Z")]
    polled = posting_as_polled(snapshot, pushes, ns("2026-06-03T00:00:00Z"))
    if new_state in ("posting_delivered", "posting_received"):
        assert polled == snapshot  # that push closes it
    else:
        assert polled["status"] == status


def test_never_further_on_than_the_snapshot():
    # The export saw the posting delivering; a delivery push it had not caught up with yet does
    # not make the poller see more than the export did.
    snapshot = {**SNAPSHOT, "status": "delivering", "cancellation": dict(EMPTY_CANCELLATION)}
    pushes = [state("posting_on_way_to_city", "2026-06-03T00:00:00Z")]
    pushes.append(state("posting_delivered", "2026-06-08T00:00:00Z"))
    polled = posting_as_polled(snapshot, pushes, ns("2026-06-09T00:00:00Z"))
    assert polled["status"] == "delivering"


def test_an_fbo_posting_has_its_top_level_cancel_reason_emptied():
    snapshot = {
        "posting_number": "200-1",
        "status": "cancelled",
        "in_process_at": ORDERED,
        "created_at": ORDERED,
        "cancel_reason_id": 400,
        "products": [],
        "analytics_data": None,
    }
    polled = posting_as_polled(snapshot, [], ns(ORDERED))
    assert polled["cancel_reason_id"] == 0
    assert polled["status"] == "awaiting_packaging"
    assert polled["analytics_data"] is None
    assert "cancellation" not in polled and "delivering_date" not in polled


def test_push_event_time():
    assert push_event_time(PUSHES[1]) == ns("2026-06-02T08:00:00Z")
    assert push_event_time(PUSHES[2]) == ns("2026-06-04T00:00:00Z")  # its received_at
    assert push_event_time({"message_type": "TYPE_DELIVERY_DATE_CHANGED"}) is None
    chat = {"message_type": "TYPE_CHAT_NEW_MESSAGE", "created_at": "2026-06-01T11:00:00Z"}
    assert push_event_time(chat) == ns("2026-06-01T11:00:00Z")


# --- build_timeline -------------------------------------------------------------------------------


def _by_posting(records: list[TimedRecord]) -> dict[str, list[TimedRecord]]:
    found: dict[str, list[TimedRecord]] = defaultdict(list)
    for record in records:
        if record.kind == POSTING:
            found[record.body["posting_number"]].append(record)
    return found


def test_the_timeline_holds_every_record_in_time_order(history):
    records = build_timeline(history)
    counts = Counter(record.kind for record in records)
    assert counts[PUSH] == len(_json_lines(history / "pushes.jsonl"))
    assert counts[PRICE] == len((history / "prices.csv").read_text().splitlines()) - 1
    assert counts[SCAN] == len((history / "tracking.csv").read_text().splitlines()) - 1
    keys = [(record.phase, record.at) for record in records]
    assert keys == sorted(keys)
    assert not any(record.catch_up for record in records)

    snapshots = {p["posting_number"]: p for p in _json_lines(history / "postings.jsonl")}
    sent = _by_posting(records)
    assert sent.keys() == snapshots.keys()
    for number, snapshot in snapshots.items():
        first, last = sent[number][0], sent[number][-1]
        assert first.at == ns(snapshot["in_process_at"])
        assert first.body["status"] == "awaiting_packaging"
        assert first.body["cancellation"] == EMPTY_CANCELLATION
        assert last.body == snapshot  # the book ends with the export's snapshot
        progress = [STATUS_PROGRESS.get(r.body["status"], 0) for r in sent[number]]
        assert progress == sorted(progress)
        # Only open postings wait for the end of the replay.
        if snapshot["status"] in ("delivered", "cancelled"):
            assert last.phase != END
    assert any(record.phase == END for record in records)


def test_every_posting_sent_is_as_the_poller_saw_it(history, tables):
    closes = tables.postings.set_index("posting_number")
    for number, sent in _by_posting(build_timeline(history)).items():
        closed_at = closes.loc[number, ["cancelled_at", "delivered_at"]].min()
        for record in sent:
            body, moment = record.body, record.at
            handed = body["delivering_date"]
            assert handed is None or ns(handed) <= moment
            if pd.isna(closed_at) or moment < closed_at.value:
                assert body["status"] not in ("delivered", "cancelled")
                assert body["cancellation"] == EMPTY_CANCELLATION


def test_a_push_dated_by_its_neighbour_carries_that_time(history):
    records = build_timeline(history)
    dated = with_receipt_times(_json_lines(history / "pushes.jsonl"))
    changes = [p for p in dated if p["message_type"] == "TYPE_DELIVERY_DATE_CHANGED"]
    assert changes and all("received_at" in p for p in changes)
    sent = [r.body for r in records if r.kind == PUSH]
    assert [p for p in sent if p["message_type"] == "TYPE_DELIVERY_DATE_CHANGED"] == changes


def test_since_replays_the_postings_open_then_or_ordered_later(history, tables):
    since = "2026-06-12T00:00:00Z"
    at = ns(since)
    records = build_timeline(history, since)
    postings = tables.postings.set_index("posting_number")
    closed = postings[["cancelled_at", "delivered_at"]].min(axis=1)
    wanted = {
        number
        for number, row in postings.iterrows()
        if row["ordered_at"].value >= at or pd.isna(closed[number]) or closed[number].value >= at
    }
    sent = _by_posting(records)
    assert set(sent) == wanted
    assert 0 < len(wanted) < len(postings)

    # All of their records, the earlier ones first as a catch-up.
    scans = pd.read_csv(history / "tracking.csv")
    expected_scans = scans[scans["posting_number"].isin(wanted)]
    assert sum(r.kind == SCAN for r in records) == len(expected_scans)
    phases = [r.phase for r in records]
    assert phases == sorted(phases)
    assert all(r.catch_up == (r.at < at) for r in records if r.phase != END)
    assert any(r.catch_up for r in records)

    # Price rows and card edits of their offers only, from before since too.
    offers = {
        product["offer_id"]
        for posting in _json_lines(history / "postings.jsonl")
        if posting["posting_number"] in wanted
        for product in posting["products"]
    }
    prices = [r.body for r in records if r.kind == PRICE]
    assert {row["offer_id"] for row in prices} <= offers
    all_prices = pd.read_csv(history / "prices.csv")
    assert len(prices) == all_prices["offer_id"].isin(offers).sum()
    edits = [r.body for r in records if r.kind == PUSH and "offer_id" in r.body]
    assert edits and {edit["offer_id"] for edit in edits} <= offers


# --- the sender, against a recording server -------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    status: int
    arrived: float
    finished: float = 0.0


@dataclass
class RecordingServer:
    """Answers 200 and keeps every request; ``answer`` may decide otherwise."""

    answer: Callable[[str, Any], tuple[int, Any] | None] = lambda _path, _body: None
    delay: Callable[[str, Any], float] = lambda _path, _body: 0.0
    received: list[Received] = field(default_factory=list)  # in the order they arrived

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        status, reply = self.answer(request.path, body) or (200, {"result": True})
        received = Received(request.path, dict(request.headers), body, status, time.monotonic())
        self.received.append(received)
        await asyncio.sleep(self.delay(request.path, body))
        received.finished = time.monotonic()
        return web.json_response(reply, status=status)

    def accepted(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path and r.status == 200]


@contextmanager
def serving(server: RecordingServer) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    application = web.Application()
    application.router.add_post("/{tail:.*}", server.handle)
    app_runner = web.AppRunner(application, access_log=None)
    loop.run_until_complete(app_runner.setup())
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = app_runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(app_runner.cleanup())
        loop.close()


def _rows(server: RecordingServer, path: str, key: str = "rows") -> list[dict[str, Any]]:
    return [row for r in server.accepted(path) for row in r.body[key]]


def test_every_record_arrives_with_its_headers_in_time_order(history):
    server = RecordingServer()
    with serving(server) as url:
        report = replay_history(
            history, url, speed=0, api_key="key-1", push_secret="secret-1", concurrency=4
        )
    assert report.ok, report.format()
    timeline = build_timeline(history)
    by_kind = Counter(r.kind for r in timeline)
    assert report.sent == dict(by_kind)

    pushes = [r.body for r in server.accepted("/v1/ozon/push")]
    assert Counter(orjson.dumps(p) for p in pushes) == Counter(
        orjson.dumps(r.body) for r in timeline if r.kind == PUSH
    )
    assert sorted(orjson.dumps(r) for r in _rows(server, "/v1/events/prices")) == sorted(
        orjson.dumps(r.body) for r in timeline if r.kind == PRICE
    )
    assert len(_rows(server, "/v1/events/tracking")) == by_kind[SCAN]
    assert len(_rows(server, "/v1/postings", "postings")) == by_kind[POSTING]
    assert max(len(r.body["rows"]) for r in server.accepted("/v1/events/tracking")) > 1

    for request in server.received:
        if request.path == "/v1/ozon/push":
            assert request.headers["X-Push-Secret"] == "secret-1"
            assert "X-API-Key" not in request.headers
        else:
            assert request.headers["X-API-Key"] == "key-1"
            assert "X-Push-Secret" not in request.headers

    # Sent in time order: no request is overtaken by one sent more than twice the concurrency
    # of requests after it.
    moments: dict[bytes, list[int]] = defaultdict(list)
    for record in timeline:
        if record.kind == POSTING:
            moments[orjson.dumps(record.body)].append(record.at)

    def first_time(request: Received) -> int:
        if request.path == "/v1/ozon/push":
            at = push_event_time(request.body)
        elif request.path == "/v1/postings":
            return min(moments[orjson.dumps(p)].pop(0) for p in request.body["postings"])
        else:
            at = ns(request.body["rows"][0]["at"])
        assert at is not None
        return at

    times = [first_time(r) for r in server.received]
    window = 2 * 4
    latest_so_far = [max(times[: k + 1]) for k in range(len(times))]
    late = [k for k in range(window, len(times)) if times[k] < latest_so_far[k - window]]
    assert not late, late[:5]


def test_after_a_whole_replay_the_book_holds_the_archive(tmp_path, history, tables):
    server = RecordingServer()
    with serving(server) as url:
        report = replay_history(history, url, speed=0, concurrency=8)
    assert report.ok
    # What the live routes would store, in the order the requests arrived.
    book = OrderBook("sqlite:///" + str(tmp_path / "book.db"))
    with book.engine.begin() as connection:
        for request in server.received:
            if request.path == "/v1/ozon/push":
                if request.body["message_type"] in KEPT_PUSH_TYPES:
                    accept_push(connection, request.body, 0)
            elif request.path == "/v1/postings":
                for posting in request.body["postings"]:
                    accept_posting(connection, posting, 0)
            else:
                accept = accept_price if request.path.endswith("prices") else accept_scan
                for row in request.body["rows"]:
                    accept(connection, row, 0)
    write_archive(book.engine, tmp_path / "archive")
    book.close()
    held = {p["posting_number"]: p for p in _json_lines(tmp_path / "archive" / "postings.jsonl")}
    assert held == {p["posting_number"]: p for p in _json_lines(history / "postings.jsonl")}
    archived = load_history(tmp_path / "archive")
    assert archived.rejects.empty
    keys = ["at", "kind", "posting_number", "offer_id", "state", "location", "price"]

    def events(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.drop(columns=["source_file", "source_line"]).sort_values(
            keys, ignore_index=True
        )

    pd.testing.assert_frame_equal(events(archived.events), events(tables.events))


def _tiny_history(directory: Path) -> Path:
    """Two postings over two hours: pushes, price rows (one refused by the server), scans."""
    directory.mkdir()
    posting = {
        "posting_number": "1-1-1",
        "status": "delivering",
        "in_process_at": "2026-06-01T00:00:00Z",
        "delivering_date": "2026-06-01T01:00:00Z",
        "cancellation": dict(EMPTY_CANCELLATION),
        "products": [{"sku": 1, "offer_id": "A", "price": "10.0", "quantity": 1}],
        "analytics_data": None,
    }
    other = {
        **posting,
        "posting_number": "2-1-1",
        "status": "awaiting_packaging",
        "in_process_at": "2026-06-01T01:30:00Z",
        "delivering_date": None,
        "products": [{"sku": 2, "offer_id": "BAD", "price": "5.0", "quantity": 1}],
    }
    (directory / "postings.jsonl").write_bytes(orjson.dumps(posting) + b"\n" + orjson.dumps(other))
    pushes = [
        {
            "message_type": "TYPE_NEW_POSTING",
            "posting_number": "1-1-1",
            "in_process_at": posting["in_process_at"],
        },
        state("posting_transferring_to_delivery", "2026-06-01T01:00:00Z")
        | {"posting_number": "1-1-1"},
        {
            "message_type": "TYPE_NEW_POSTING",
            "posting_number": "2-1-1",
            "in_process_at": other["in_process_at"],
        },
        state("posting_on_way_to_city", "2026-06-01T02:00:00Z") | {"posting_number": "1-1-1"},
    ]
    (directory / "pushes.jsonl").write_bytes(b"\n".join(orjson.dumps(p) for p in pushes) + b"\n")
    (directory / "prices.csv").write_text(
        "offer_id,at,price,old_price,currency_code\n"
        "A,2026-05-31T00:00:00Z,10.0,,CNY\n"
        "BAD,2026-06-01T00:30:00Z,5.0,6.0,CNY\n"
    )
    (directory / "tracking.csv").write_text(
        "posting_number,at,status,location\n"
        "1-1-1,2026-06-01T01:10:00Z,Принят,Москва\n"
        "1-1-1,2026-06-01T01:50:00Z,В пути,\n"
    )
    return directory


def test_a_503_is_retried_and_a_refusal_reported(tmp_path):
    history = _tiny_history(tmp_path / "history")
    unavailable = {"left": 3}

    def answer(path: str, body: Any) -> tuple[int, Any] | None:
        if path == "/v1/ozon/push" and unavailable["left"]:
            unavailable["left"] -= 1
            return 503, {"error": {"code": "ERROR_UNKNOWN"}}
        if path == "/v1/events/prices" and any(r["offer_id"] == "BAD" for r in body["rows"]):
            return 422, {"detail": "no such offer"}
        return None

    server = RecordingServer(answer)
    with serving(server) as url:
        report = replay_history(history, url, speed=0, concurrency=2, retry_backoff=0.01)
    assert report.retries == 3
    assert report.sent[PUSH] == 4  # every push got through in the end
    assert len(server.accepted("/v1/ozon/push")) == 4
    # Both price rows are due at once (speed 0), so they share the refused request.
    assert report.refused == 2 and not report.ok
    (refusal,) = report.refusals
    assert (refusal.kind, refusal.file, refusal.lines, refusal.status) == (
        PRICE,
        "prices.csv",
        (2, 3),
        422,
    )
    assert "no such offer" in refusal.body
    assert "prices.csv:2-3" in report.format() and "HTTP 422" in report.format()

    with serving(server) as url:
        result = runner.invoke(
            app, ["replay", "--history", str(history), "--url", url, "--speed", "0"]
        )
    assert result.exit_code == 1
    assert "refused: 2" in result.stdout


def test_records_the_service_rejects_inside_an_accepted_request_are_reported(tmp_path):
    history = _tiny_history(tmp_path / "history")

    def answer(path: str, body: Any) -> tuple[int, Any] | None:
        if path == "/v1/events/tracking":
            rows = body["rows"]
            return 200, {
                "stored": len(rows) - 1,
                "duplicates": 0,
                "rejected": [{"index": len(rows) - 1, "reason": "scan row: no at"}],
            }
        if path == "/v1/postings":
            return 200, {"stored": 0, "duplicates": len(body["postings"]), "rejected": []}
        return None

    with serving(RecordingServer(answer)) as url:
        report = replay_history(history, url, speed=0)
    # Both scans are due at once (speed 0): one request, whose last row the service refused.
    assert report.refused == 1
    assert sorted(r.lines for r in report.refusals) == [(3,)]
    assert {r.body for r in report.refusals} == {"scan row: no at"}
    assert report.duplicates == report.sent[POSTING] > 0


def test_records_are_paced_by_speed(tmp_path):
    history = _tiny_history(tmp_path / "history")
    server = RecordingServer()
    hours = 26  # the price row a day before the first order, then two hours of records
    speed = hours * 3600 / 0.6  # the whole history in 0.6 s
    with serving(server) as url:
        report = replay_history(history, url, speed=speed)
    assert report.ok
    start = server.received[0].arrived
    for request in server.received:
        if request.path == "/v1/ozon/push":
            at = push_event_time(request.body)
            assert at is not None
            due = (at - ns("2026-05-31T00:00:00Z")) / 1e9 / speed
            assert request.arrived - start == pytest.approx(due, abs=0.15)
    assert 0.55 < report.elapsed_seconds < 1.5


def test_since_sends_the_catch_up_first(tmp_path):
    history = _tiny_history(tmp_path / "history")
    since = ns("2026-06-01T01:05:00Z")

    def is_push_before_since(path: str, body: Any) -> bool:
        return path == "/v1/ozon/push" and (push_event_time(body) or 0) < since

    # A slow answer to the first push: the paced records still wait for the catch-up to end.
    def delay(path: str, body: Any) -> float:
        return 0.3 if is_push_before_since(path, body) and "2-1-1" not in str(body) else 0.0

    server = RecordingServer(delay=delay)
    with serving(server) as url:
        report = replay_history(history, url, speed=0, since="2026-06-01T01:05:00Z")
    assert report.ok and report.caught_up > 0
    catch_up = [r for r in server.received if is_push_before_since(r.path, r.body)]
    paced = [
        r
        for r in server.received
        if r.path == "/v1/ozon/push" and not is_push_before_since(r.path, r.body)
    ]
    assert catch_up and paced
    assert min(r.arrived for r in paced) >= max(r.finished for r in catch_up)


def test_a_service_that_stays_away_stops_the_replay(tmp_path):
    history = _tiny_history(tmp_path / "history")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once it is closed
    report = replay_history(
        history,
        f"http://127.0.0.1:{port}",
        speed=0,
        concurrency=1,
        max_attempts=3,
        retry_backoff=0.01,
    )
    assert not report.ok
    assert report.stopped is not None and "unreachable" in report.stopped
    assert report.retries == 2
    assert report.records_sent == 0
    # The first request, the two price rows due first, stayed unanswered; nothing else went.
    assert report.refused == 2 and report.unsent == len(build_timeline(history)) - 2
    assert report.refusals[0].status is None
    assert "stopped early" in report.format()


def test_the_replay_command_refuses_a_bad_since(tmp_path):
    history = _tiny_history(tmp_path / "history")
    result = runner.invoke(
        app,
        ["replay", "--history", str(history), "--url", "http://127.0.0.1:9", "--since", "soon"],
    )
    assert result.exit_code == 2
    assert "--since" in result.output


def test_read_timeline_counts_what_it_cannot_send(tmp_path):
    history = _tiny_history(tmp_path / "history")
    with (history / "pushes.jsonl").open("ab") as handle:
        handle.write(b"{not json\n")
        handle.write(
            orjson.dumps(
                {
                    "message_type": "TYPE_STATE_CHANGED",
                    "posting_number": "1-1-1",
                    "new_state": "posting_in_carriage",
                }
            )
            + b"\n"
        )
    timeline = read_timeline(history)
    assert timeline.skipped == {
        "pushes.jsonl: line that is not JSON": 1,
        "push without a time": 1,
    }
    assert sum(r.kind == PUSH for r in timeline.records) == 4
