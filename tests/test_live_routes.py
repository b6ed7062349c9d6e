"""The live routes' protocol, over real HTTP against a real ``cancel-risk serve --live``.

- Ozon's push endpoint answers as Ozon's document (``push_start``, ``push_types``,
  ``push_resending``) asks: ``TYPE_PING`` with ``{version, name, time}``, every other
  notification 200 ``{"result": true}`` (a kept type stored once however often it comes, the
  others not stored), errors 4xx in Ozon's ``{"error": {code, message, details}}`` naming the
  field; the shared secret, the source allow-list and a custom path refuse or route as set.
- The event routes store the usable records of a batch and list each unusable one with its
  index and what is wrong; a record the book holds counts as a duplicate.
- The read routes give each posting the worker scored (probability, level, reasons, actions in
  the language asked, history), filter by level and walk every open posting in keyset pages.

One service (SQLite book) serves the module; two more start only for the access settings.
Its book is seeded first with a few postings open at a moment of a simulated shop's history and
their records up to then, so that the book's clock is the history's (a notification without a
time of its own, e.g. a delivery-date change, is dated by that clock, not the wall clock).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from live_service import ADMIN, LiveService

from core.tables import TERMINAL_STATUSES
from live.book import read_moment
from live.replay import PACED, POSTING, PRICE, PUSH, SCAN, build_timeline

pytestmark = pytest.mark.slow

PUSH_PATH = "/v1/ozon/push"
SECRET = "s3cret"
CUSTOM_PATH = "/hooks/ozon"
ERROR_KEYS = {"code", "message", "details"}
CJK = re.compile(r"[\u4e00-\u9fff]")

# Ozon's example bodies, verbatim from the push_types section of its Seller API document.
KEPT_EXAMPLES: dict[str, dict[str, Any]] = {
    "TYPE_NEW_POSTING": {
        "message_type": "TYPE_NEW_POSTING",
        "posting_number": "24219509-0020-1",
        "products": [{"sku": 147451959, "quantity": 2}],
        "in_process_at": "2021-01-26T06:56:36.294Z",
        "warehouse_id": 18850503335000,
        "seller_id": 15,
    },
    "TYPE_POSTING_CANCELLED": {
        "message_type": "TYPE_POSTING_CANCELLED",
        "posting_number": "24219509-0020-1",
        "products": [{"sku": 147451959, "quantity": 1}],
        "old_state": "posting_transferred_to_courier_service",
        "new_state": "posting_canceled",
        "changed_state_date": "2021-01-26T06:56:36.294Z",
        "reason": {"id": 0, "message": "string"},
        "warehouse_id": 0,
        "seller_id": 15,
    },
    "TYPE_STATE_CHANGED": {
        "message_type": "TYPE_STATE_CHANGED",
        "posting_number": "24219509-0020-2",
        "new_state": "posting_delivered",
        "changed_state_date": "2021-02-02T15:07:46.765Z",
        "warehouse_id": 0,
        "seller_id": 15,
    },
    "TYPE_CUTOFF_DATE_CHANGED": {
        "message_type": "TYPE_CUTOFF_DATE_CHANGED",
        "posting_number": "24219509-0020-2",
        "new_cutoff_date": "2021-11-24T07:00:00Z",
        "old_cutoff_date": "2021-11-21T10:00:00Z",
        "warehouse_id": 0,
        "seller_id": 15,
    },
    "TYPE_DELIVERY_DATE_CHANGED": {
        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
        "posting_number": "24219509-0020-2",
        "new_delivery_date_begin": "2021-11-24T07:00:00Z",
        "new_delivery_date_end": "2021-11-24T16:00:00Z",
        "old_delivery_date_begin": "2021-11-21T10:00:00Z",
        "old_delivery_date_end": "2021-11-21T19:00:00Z",
        "warehouse_id": 0,
        "seller_id": 15,
    },
    "TYPE_CREATE_OR_UPDATE_ITEM": {
        "message_type": "TYPE_CREATE_OR_UPDATE_ITEM",
        "seller_id": 0,
        "offer_id": "string",
        "product_id": 0,
        "is_error": False,
        "changed_at": "2022-09-01T14:15:22Z",
    },
}
# The document's examples of types the book does not keep (their message_type filled in where
# the document leaves "string").
OTHER_EXAMPLES: dict[str, dict[str, Any]] = {
    "TYPE_NEW_MESSAGE": {
        "message_type": "TYPE_NEW_MESSAGE",
        "chat_id": "b646d975-0c9c-4872-9f41-8b1e57181063",
        "chat_type": "Buyer_Seller",
        "message_id": "3000000000817031942",
        "created_at": "2022-07-18T20:58:04.528Z",
        "user": {"id": "115568", "type": "Сustomer"},
        "data": ["Текст сообщения"],
        "seller_id": "7",
    },
    "TYPE_STOCKS_CHANGED": {
        "message_type": "TYPE_STOCKS_CHANGED",
        "seller_id": 0,
        "items": [
            {
                "product_id": 0,
                "sku": 0,
                "updated_at": "2021-09-01T14:15:22Z",
                "stocks": [{"warehouse_id": 0, "present": 0, "reserved": 0}],
            }
        ],
    },
    "TYPE_PRICE_INDEX_CHANGED": {
        "seller_id": 0,
        "message_type": "TYPE_PRICE_INDEX_CHANGED",
        "updated_at": "2022-06-21T05:52:46.648533678Z",
        "sku": 0,
        "product_id": 0,
        "price_index": 0,
    },
}
PING = {"message_type": "TYPE_PING", "time": "2019-08-24T14:15:22Z"}


# --- the history sample ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """Postings open at ``cut`` in a simulated history, as polled then, and their records."""

    cut: int
    open_postings: list[dict[str, Any]]
    pushes: list[dict[str, Any]]
    prices: list[dict[str, Any]]
    scans: list[dict[str, Any]]
    closed_postings: list[dict[str, Any]]  # other postings, closed before the cut
    spare_price: dict[str, Any]  # a price row of an offer no sampled posting holds
    spare_scan: dict[str, Any]  # a scan of a posting the book does not hold

    @property
    def open_numbers(self) -> set[str]:
        return {posting["posting_number"] for posting in self.open_postings}


def build_sample(history: Path, open_count: int = 16) -> Sample:
    records = [record for record in build_timeline(history) if record.phase == PACED]
    cut = records[2 * len(records) // 3].at
    before = [record for record in records if record.at <= cut]
    polled: dict[str, dict[str, Any]] = {}
    for record in before:
        if record.kind == POSTING:
            polled[record.body["posting_number"]] = record.body
    still_open = sorted(n for n, p in polled.items() if p["status"] not in TERMINAL_STATUSES)
    # Spread over the order times: some just ordered, some waiting long.
    step = max(1, len(still_open) // open_count)
    chosen = set(still_open[::step][:open_count])
    offers = {product["offer_id"] for number in chosen for product in polled[number]["products"]}
    closed = sorted(n for n, p in polled.items() if p["status"] in TERMINAL_STATUSES)[:6]

    def own(record: Any) -> bool:
        body = record.body
        return body.get("posting_number") in chosen or body.get("offer_id") in offers

    spare_prices = [r.body for r in before if r.kind == PRICE and r.body["offer_id"] not in offers]
    spare_scans = [
        r.body
        for r in before
        if r.kind == SCAN and r.body["posting_number"] not in chosen | set(closed)
    ]
    return Sample(
        cut=cut,
        open_postings=[polled[number] for number in sorted(chosen)],
        pushes=[r.body for r in before if r.kind == PUSH and own(r)],
        prices=[r.body for r in before if r.kind == PRICE and own(r)],
        scans=[r.body for r in before if r.kind == SCAN and own(r)],
        closed_postings=[polled[number] for number in closed],
        spare_price=spare_prices[-1],
        spare_scan=spare_scans[-1],
    )


# --- the services ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(simulated_history: Path) -> Sample:
    return build_sample(simulated_history)


def _stop(live: LiveService) -> None:
    """SIGTERM to the server alone (as ``docker stop`` sends it), then the harness's stop.

    The harness signals the whole process group: the worker dies inside its stop event's
    ``wait()``, and the server's ``Event.set()`` then blocks until the harness's ``kill -9``
    20 s later (a multiprocessing Condition waits for its dead sleeper to wake).
    """
    if live.process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(live.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            live.process.wait(timeout=20)
    live.stop()


@contextlib.contextmanager
def _running(model: Path, work: Path, env: dict[str, str] | None = None) -> Iterator[LiveService]:
    live = LiveService(model, f"sqlite:///{work / 'book.db'}", work, env=env or {})
    try:
        yield live.start()
    finally:
        _stop(live)


@pytest.fixture(scope="module")
def service(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, sample: Sample
) -> Iterator[LiveService]:
    with _running(tiny_model_dir, tmp_path_factory.mktemp("live-routes")) as live:
        with live.client() as client:
            client.post("/v1/postings", json={"postings": sample.open_postings}).raise_for_status()
            for push in sample.pushes:
                client.post(PUSH_PATH, json=push).raise_for_status()
            client.post("/v1/events/prices", json={"rows": sample.prices}).raise_for_status()
            client.post("/v1/events/tracking", json={"rows": sample.scans}).raise_for_status()
        yield live


# The access tests need no re-scoring: no worker, a faster start.
@pytest.fixture(scope="module")
def guarded(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveService]:
    """A secret, loopback allowed, pushes at a path of their own."""
    env = {
        "CANCEL_RISK_PUSH_SECRET": SECRET,
        "CANCEL_RISK_PUSH_ALLOWED_NETS": "127.0.0.0/8",
        "CANCEL_RISK_PUSH_PATH": CUSTOM_PATH,
        "CANCEL_RISK_WORKER": "false",
    }
    with _running(tiny_model_dir, tmp_path_factory.mktemp("live-guarded"), env) as live:
        yield live


@pytest.fixture(scope="module")
def ozon_only(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveService]:
    """Pushes only from Ozon's published networks, behind a proxy (X-Forwarded-For)."""
    env = {
        "CANCEL_RISK_PUSH_ALLOWED_NETS": "ozon",
        "CANCEL_RISK_TRUST_FORWARDED_FOR": "true",
        "CANCEL_RISK_WORKER": "false",
    }
    with _running(tiny_model_dir, tmp_path_factory.mktemp("live-ozon-only"), env) as live:
        yield live


@pytest.fixture
def client(service: LiveService) -> Iterator[httpx.Client]:
    with service.client() as http:
        yield http


def _push(client: httpx.Client, body: Any, path: str = PUSH_PATH, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, content=content, **kwargs)


def _ozon_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The error of an answer in Ozon's shape, its status and code checked."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def _count(service: LiveService, what: str) -> int:
    return int(service.status()[what])


# --- Ozon's push endpoint -------------------------------------------------------------------------


def test_ping_answers_version_name_and_the_utc_time_processing_began(
    client: httpx.Client,
) -> None:
    response = _push(client, PING)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert set(answer) == {"version", "name", "time"}
    assert answer["name"] == "ozon-cancel-risk"
    assert isinstance(answer["version"], str) and answer["version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", answer["time"])
    began = datetime.fromisoformat(answer["time"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - began).total_seconds()) < 5


@pytest.mark.parametrize("message_type", sorted(KEPT_EXAMPLES))
def test_a_kept_notification_is_acknowledged_and_stored_once(
    service: LiveService, client: httpx.Client, message_type: str
) -> None:
    push = KEPT_EXAMPLES[message_type]
    before = _count(service, "pushes")
    for _ in range(2):  # Ozon's retry of a notification it thinks undelivered
        response = _push(client, push)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"result": True}
    assert _count(service, "pushes") == before + 1


@pytest.mark.parametrize("message_type", sorted(OTHER_EXAMPLES))
def test_a_type_the_book_does_not_keep_is_acknowledged_not_stored(
    service: LiveService, client: httpx.Client, message_type: str
) -> None:
    before = _count(service, "pushes")
    response = _push(client, OTHER_EXAMPLES[message_type])
    assert response.status_code == 200, response.text
    assert response.json() == {"result": True}
    assert _count(service, "pushes") == before


# Values Ozon's document says may come empty: a late-paid order's in_process_at, a deleted
# delivery interval's new dates, a deleted interval's new cutoff.
_EMPTIED = {
    "TYPE_NEW_POSTING": {"posting_number": "24219509-0030-1", "in_process_at": ""},
    "TYPE_DELIVERY_DATE_CHANGED": {
        "posting_number": "24219509-0030-2",
        "new_delivery_date_begin": "",
        "new_delivery_date_end": "",
    },
    "TYPE_CUTOFF_DATE_CHANGED": {"posting_number": "24219509-0030-2", "new_cutoff_date": ""},
}


@pytest.mark.parametrize("message_type", sorted(_EMPTIED))
def test_a_value_the_document_says_may_be_empty_is_accepted(
    service: LiveService, client: httpx.Client, message_type: str
) -> None:
    before = _count(service, "pushes")
    response = _push(client, {**KEPT_EXAMPLES[message_type], **_EMPTIED[message_type]})
    assert response.status_code == 200, response.text
    assert response.json() == {"result": True}
    assert _count(service, "pushes") == before + 1


_STATE = KEPT_EXAMPLES["TYPE_STATE_CHANGED"]


@pytest.mark.parametrize(
    ("body", "code", "named"),
    [
        pytest.param(b'{"message_type": "TYPE_PING"', "ERROR_UNKNOWN", "JSON", id="not-json"),
        pytest.param([_STATE], "ERROR_UNKNOWN", "object", id="an-array"),
        pytest.param(
            {"posting_number": "24219509-0020-2"},
            "ERROR_PARAMETER_VALUE_MISSED",
            "message_type",
            id="no-message-type",
        ),
        pytest.param(
            {k: v for k, v in _STATE.items() if k != "posting_number"},
            "ERROR_PARAMETER_VALUE_MISSED",
            "posting_number",
            id="no-posting-number",
        ),
        pytest.param(
            {k: v for k, v in _STATE.items() if k != "new_state"},
            "ERROR_PARAMETER_VALUE_MISSED",
            "new_state",
            id="no-new-state",
        ),
        pytest.param(
            {**_STATE, "posting_number": "24219509-0021-1", "changed_state_date": "yesterday"},
            "ERROR_UNKNOWN",
            "changed_state_date",
            id="unreadable-time",
        ),
        pytest.param(
            {**_STATE, "posting_number": "24219509-0021-2", "changed_state_date": "now"},
            "ERROR_UNKNOWN",
            "changed_state_date",
            id="time-now",
        ),
    ],
)
def test_an_unusable_notification_is_400_in_ozons_shape_naming_the_problem(
    service: LiveService, client: httpx.Client, body: Any, code: str, named: str
) -> None:
    before = _count(service, "pushes")
    error = _ozon_error(_push(client, body), 400, code)
    assert named in error["message"]
    assert _count(service, "pushes") == before


# --- access to the push endpoint ------------------------------------------------------------------


def test_the_secret_is_asked_in_the_path_or_the_header(guarded: LiveService) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        _ozon_error(_push(client, PING, CUSTOM_PATH), 403, "ERROR_UNKNOWN")
        _ozon_error(_push(client, PING, f"{CUSTOM_PATH}/wrong"), 403, "ERROR_UNKNOWN")
        wrong = {"X-Push-Secret": "wrong"}
        _ozon_error(_push(client, PING, CUSTOM_PATH, headers=wrong), 403, "ERROR_UNKNOWN")
        by_path = _push(client, PING, f"{CUSTOM_PATH}/{SECRET}")
        assert by_path.status_code == 200, by_path.text
        assert set(by_path.json()) == {"version", "name", "time"}
        by_header = _push(client, _STATE, CUSTOM_PATH, headers={"X-Push-Secret": SECRET})
        assert by_header.status_code == 200, by_header.text
        assert by_header.json() == {"result": True}
    assert _count(guarded, "pushes") == 1


def test_a_custom_push_path_replaces_the_default(guarded: LiveService) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        assert _push(client, PING, f"{CUSTOM_PATH}/{SECRET}").status_code == 200
        assert _push(client, PING, PUSH_PATH).status_code == 404
        assert _push(client, PING, f"{PUSH_PATH}/{SECRET}").status_code == 404


def test_pushes_from_an_allowed_network_are_answered(guarded: LiveService) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as client:  # from 127.0.0.1
        response = _push(client, PING, f"{CUSTOM_PATH}/{SECRET}")
    assert response.status_code == 200, response.text


def test_pushes_from_outside_ozons_networks_are_refused(ozon_only: LiveService) -> None:
    with httpx.Client(base_url=ozon_only.url, timeout=30) as client:  # from 127.0.0.1
        _ozon_error(_push(client, PING), 403, "ERROR_UNKNOWN")
        error = _ozon_error(_push(client, _STATE), 403, "ERROR_UNKNOWN")
        assert "address" in error["message"]
    assert _count(ozon_only, "pushes") == 0


def test_behind_a_proxy_the_address_it_saw_is_checked(ozon_only: LiveService) -> None:
    with httpx.Client(base_url=ozon_only.url, timeout=30) as proxy:
        seen_ozon = {"X-Forwarded-For": "195.34.21.7"}
        assert _push(proxy, PING, headers=seen_ozon).status_code == 200
        # A client's own X-Forwarded-For comes first; the proxy appends the address it saw.
        forged = {"X-Forwarded-For": "195.34.21.7, 203.0.113.9"}
        _ozon_error(_push(proxy, _STATE, headers=forged), 403, "ERROR_UNKNOWN")
        added = [("X-Forwarded-For", "195.34.21.7"), ("X-Forwarded-For", "203.0.113.9")]
        _ozon_error(_push(proxy, _STATE, headers=added), 403, "ERROR_UNKNOWN")
    assert _count(ozon_only, "pushes") == 0


def test_x_forwarded_for_is_not_trusted_unless_told(guarded: LiveService) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as client:  # 127.0.0.0/8 is allowed
        forged = {"X-Forwarded-For": "203.0.113.9"}
        response = _push(client, PING, f"{CUSTOM_PATH}/{SECRET}", headers=forged)
    assert response.status_code == 200, response.text


# --- the event routes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/postings"),
        ("POST", "/v1/events/prices"),
        ("POST", "/v1/events/tracking"),
        ("GET", "/v1/postings"),
        ("GET", "/v1/postings/24219509-0020-1"),
        ("GET", "/v1/live/status"),
        ("POST", "/v1/live/sweep"),
    ],
)
def test_the_book_routes_need_an_api_key(service: LiveService, method: str, path: str) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as anonymous:
        body = {"postings": []} if method == "POST" else None
        assert anonymous.request(method, path, json=body).status_code == 401
        wrong = {"X-API-Key": "not-a-key"}
        assert anonymous.request(method, path, json=body, headers=wrong).status_code == 401


def _reasons(reply: dict[str, Any]) -> dict[int, str]:
    return {reject["index"]: reject["reason"] for reject in reply["rejected"]}


def test_postings_store_the_usable_objects_and_list_the_others(
    service: LiveService, client: httpx.Client, sample: Sample
) -> None:
    good = sample.closed_postings[:2]
    priced = copy.deepcopy(sample.closed_postings[2])
    priced["products"][0]["price"] = "abc"
    undated = {k: v for k, v in sample.closed_postings[3].items() if k != "in_process_at"}
    unnumbered = {k: v for k, v in sample.closed_postings[3].items() if k != "posting_number"}
    batch = [good[0], "not an object", unnumbered, priced, undated, good[1]]
    before = _count(service, "postings")
    reply = client.post("/v1/postings", json={"postings": batch})
    assert reply.status_code == 200, reply.text
    assert reply.json()["stored"] == 2
    assert reply.json()["duplicates"] == 0
    reasons = _reasons(reply.json())
    assert set(reasons) == {1, 2, 3, 4}
    assert "object" in reasons[1]
    assert "posting_number" in reasons[2]
    assert "price" in reasons[3] and "abc" in reasons[3]
    assert "in_process_at" in reasons[4]
    assert _count(service, "postings") == before + 2

    again = client.post("/v1/postings", json={"postings": batch}).json()
    assert (again["stored"], again["duplicates"]) == (0, 2)
    assert _reasons(again) == reasons
    assert _count(service, "postings") == before + 2


def test_postings_take_the_seller_apis_reply_as_it_is(
    service: LiveService, client: httpx.Client, sample: Sample
) -> None:
    reply_shape = {"result": {"postings": sample.closed_postings[4:6], "has_next": False}}
    before = _count(service, "postings")
    reply = client.post("/v1/postings", json=reply_shape)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"stored": 2, "duplicates": 0, "rejected": []}
    assert _count(service, "postings") == before + 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/postings", {"orders": [{"posting_number": "24219509-0020-1"}]}),
        ("/v1/postings", "postings"),
        ("/v1/postings", b"{not json"),
        ("/v1/events/prices", {"postings": []}),
        ("/v1/events/prices", [{"offer_id": "A", "at": "2026-06-01T00:00:00Z", "price": "1"}]),
        ("/v1/events/prices", b"{not json"),
        ("/v1/events/tracking", {"scans": []}),
        ("/v1/events/tracking", b"{not json"),
    ],
)
def test_a_body_of_no_known_shape_is_422(client: httpx.Client, path: str, body: Any) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = client.post(path, content=content)
    assert response.status_code == 422, response.text


def test_price_rows_store_the_usable_ones_and_list_the_others(
    service: LiveService, client: httpx.Client, sample: Sample
) -> None:
    good = sample.spare_price
    rows = [
        good,
        {**good, "price": "abc"},
        {k: v for k, v in good.items() if k != "offer_id"},
        {**good, "at": "yesterday"},
    ]
    before = _count(service, "prices")
    reply = client.post("/v1/events/prices", json={"rows": rows})
    assert reply.status_code == 200, reply.text
    assert (reply.json()["stored"], reply.json()["duplicates"]) == (1, 0)
    reasons = _reasons(reply.json())
    assert set(reasons) == {1, 2, 3}
    assert "price" in reasons[1] and "abc" in reasons[1]
    assert "offer_id" in reasons[2]
    assert "at" in reasons[3] and "yesterday" in reasons[3]
    again = client.post("/v1/events/prices", json={"rows": rows}).json()
    assert (again["stored"], again["duplicates"]) == (0, 1)
    assert _count(service, "prices") == before + 1


def test_scans_store_the_usable_ones_and_list_the_others(
    service: LiveService, client: httpx.Client, sample: Sample
) -> None:
    good = sample.spare_scan
    rows = [
        {k: v for k, v in good.items() if k != "posting_number"},
        good,
        {**good, "at": "yesterday"},
    ]
    before = _count(service, "scans")
    reply = client.post("/v1/events/tracking", json={"rows": rows})
    assert reply.status_code == 200, reply.text
    assert (reply.json()["stored"], reply.json()["duplicates"]) == (1, 0)
    reasons = _reasons(reply.json())
    assert set(reasons) == {0, 2}
    assert "posting_number" in reasons[0]
    assert "at" in reasons[2] and "yesterday" in reasons[2]
    again = client.post("/v1/events/tracking", json={"rows": rows}).json()
    assert (again["stored"], again["duplicates"]) == (0, 1)
    assert _count(service, "scans") == before + 1


# --- the read routes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(service: LiveService) -> dict[str, Any]:
    """The book's status once the worker has scored everything it received."""
    deadline = time.monotonic() + 120
    while (status := service.status())["pending"] != 0:
        assert time.monotonic() < deadline, f"still pending: {status}"
        time.sleep(0.1)
    return status


def _walk(client: httpx.Client, limit: int, **params: Any) -> list[list[dict[str, Any]]]:
    pages, after = [], None
    while True:
        query = {"limit": limit, **params, **({} if after is None else {"after": after})}
        page = client.get("/v1/postings", params=query)
        assert page.status_code == 200, page.text
        pages.append(page.json()["postings"])
        after = page.json()["next_after"]
        if after is None:
            return pages
        assert len(pages) < 1000, "the pages do not end"


def test_a_scored_posting_has_its_risk_reasons_actions_and_history(
    client: httpx.Client, sample: Sample, scored: dict[str, Any]
) -> None:
    ordered = {posting["posting_number"]: posting for posting in sample.open_postings}
    for number in sorted(ordered):
        response = client.get(f"/v1/postings/{number}")
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["posting_number"] == number
        assert view["open"] is True and view["pending"] is False
        score = view["score"]
        assert score is not None, view
        assert 0 < score["probability"] < 1
        assert score["risk_level"] in {"low", "medium", "high"}
        explanation = score["explanation"]
        assert {"reasons", "actions", "decision"} <= set(explanation)
        if score["risk_level"] != "low":  # a low risk needs no reason, and "ship" no action
            assert explanation["reasons"] and explanation["actions"], explanation
        assert all(reason["code"] and "facts" in reason for reason in explanation["reasons"])
        # At the book's clock: the history's, not the wall clock's.
        ordered_at = read_moment(ordered[number]["in_process_at"])
        assert ordered_at <= read_moment(score["as_of"]) <= sample.cut
        assert view["history"]
        assert view["history"][-1]["probability"] == score["probability"]
        assert view["records"]["pushes"] >= 1


def _probability(client: httpx.Client, number: str) -> float:
    return client.get(f"/v1/postings/{number}").json()["score"]["probability"]


def test_lang_zh_gives_the_reasons_and_actions_in_chinese(
    client: httpx.Client, sample: Sample, scored: dict[str, Any]
) -> None:
    number = max(sample.open_numbers, key=lambda n: _probability(client, n))
    english = client.get(f"/v1/postings/{number}", params={"lang": "en"}).json()["score"]
    chinese = client.get(f"/v1/postings/{number}", params={"lang": "zh"}).json()["score"]
    assert chinese["probability"] == english["probability"]
    en, zh = english["explanation"], chinese["explanation"]
    assert [r["code"] for r in zh["reasons"]] == [r["code"] for r in en["reasons"]]
    assert [r["facts"] for r in zh["reasons"]] != [r["facts"] for r in en["reasons"]]
    # The actions are the playbook's own texts (facts may quote a Chinese warehouse's name).
    assert zh["actions"] and len(zh["actions"]) == len(en["actions"])
    assert all(CJK.search(action) for action in zh["actions"])
    assert not any(CJK.search(action) for action in en["actions"])


def test_an_unknown_posting_is_404(client: httpx.Client) -> None:
    assert client.get("/v1/postings/00000000-0000-9").status_code == 404


def test_pages_walk_every_open_posting_once(
    service: LiveService, client: httpx.Client, sample: Sample, scored: dict[str, Any]
) -> None:
    pages = _walk(client, 2)
    assert all(len(page) <= 2 for page in pages)
    numbers = [row["posting_number"] for page in pages for row in page]
    assert len(numbers) == len(set(numbers))
    assert numbers == sorted(numbers)
    assert set(numbers) == sample.open_numbers
    assert len(numbers) == service.status()["open"]
    assert all(row["open"] for page in pages for row in page)


def test_risk_high_lists_only_the_high_ones(
    client: httpx.Client, sample: Sample, scored: dict[str, Any]
) -> None:
    everything = [row for page in _walk(client, 1000) for row in page]
    levels = {row["posting_number"]: row["risk_level"] for row in everything}
    high = [row for page in _walk(client, 2, risk="high") for row in page]
    expected = {number for number, level in levels.items() if level == "high"}
    assert {row["posting_number"] for row in high} == expected
    assert all(row["risk_level"] == "high" for row in high)
    # Not a filter that cannot fail: the book holds both high and lower ones.
    assert high and len(high) < len(everything), levels


def test_a_sweep_needs_the_admin_key(service: LiveService, client: httpx.Client) -> None:
    assert client.post("/v1/live/sweep").status_code == 403
    with httpx.Client(base_url=service.url, headers={"X-API-Key": ADMIN}, timeout=30) as admin:
        response = admin.post("/v1/live/sweep")
    assert response.status_code == 202, response.text
    assert int(response.json()["requested"]) > 0


# --- health ---------------------------------------------------------------------------------------


def test_readiness_has_no_warnings(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["warnings"] == []


def test_metrics_count_pushes_and_pending_postings(client: httpx.Client) -> None:
    _push(client, PING)
    text = client.get("/metrics").text
    assert re.search(r'^cancel_risk_pushes_total\{.*outcome="ping".*\} [1-9]', text, re.M)
    assert re.search(r'^cancel_risk_pushes_total\{.*outcome="stored".*\} [1-9]', text, re.M)
    assert re.search(r"^cancel_risk_book_pending_postings \d", text, re.M)
