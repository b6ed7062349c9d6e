"""Replay a history directory into a running service, in time order, as Ozon and a poller would.

::

    cancel-risk replay --history data/demo/history --url http://127.0.0.1:8000 \\
        --api-key demo-key --speed 3600

Every record of the history becomes a request to the service's live routes:

- a push (``pushes.jsonl``) is one ``POST {url}{push_path}`` with the push as its body (and
  ``X-Push-Secret``), as Ozon sends it. A push that the archive dates by its neighbours (a
  delivery-date change without a time: :func:`core.ingest.events.with_receipt_times`) carries
  that time as its ``received_at``, so the book dates it as the archive does;
- price rows (``prices.csv``) and carrier scans (``tracking.csv``) go in batches of the rows
  due together to ``/v1/events/prices`` and ``/v1/events/tracking`` (``X-API-Key``);
- posting objects go to ``/v1/postings``, as the seller's poller would have seen them:
  ``postings.jsonl`` is the export's snapshot (final status, cancellation, hand-over date,
  latest promise), so at the order time and at each of the posting's state pushes the replay
  sends the snapshot rolled back to that moment (:func:`posting_as_polled`), the full snapshot
  at its closing push, and the snapshot of a posting still open at the end of the replay.
  After a whole replay the book holds exactly the archive's snapshots.

Time runs ``speed`` seconds of history per wall second (0: as fast as possible). With
``since``, only the postings open at ``since`` or ordered after it are replayed, with all their
records and the price rows and card edits of their offers: the records before ``since`` first,
at once (a catch-up), then the rest paced.

Requests go out in time order over a keep-alive aiohttp session with at most ``concurrency``
in flight, so they arrive in near-time order: the book keeps each record once whatever the
order, and keeps the most progressed posting object (a closing snapshot is more progressed
than every rollback before it). Where the order would matter it is kept strictly: the paced
replay starts once the catch-up has been answered, and the snapshots of postings still open
at the end once everything else has. A 503 (or 429, 502, 504) or a connection error is
retried with exponential backoff, as Ozon retries its pushes; a request still not through
after the last attempt stops the replay. Any other refusal is reported with its file, line,
status and body, and counted.

A 2xx reply may say what the service made of the records: ``{"duplicates": n}`` (or, for a
single record, ``{"duplicate": true}`` / ``{"stored": false}``) and ``{"rejected": [{"index",
"reason"}, ...]}`` (or a count), the records of the request it refused, which are reported
like refused requests (the live routes answer so).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson

from batch.progress import Progress
from core.ingest.events import (
    DELIVERED_STATES,
    PUSH_SPECS,
    RECEIVED_AT,
    next_push_times,
    with_receipt_times,
)
from core.ingest.history import (
    POSTINGS_JSON_GLOB,
    POSTINGS_JSONL,
    PRICES_CSV,
    PUSHES_JSONL,
    TRACKING_CSV,
    build_reply_postings,
    csv_separator,
)
from core.ingest.jsonlines import BOM
from core.ingest.postings import STATUS_PROGRESS
from core.tables import TERMINAL_STATUSES
from live.book import PUSH_TIME_KEYS, read_moment

logger = logging.getLogger(__name__)

DEFAULT_PUSH_PATH = "/v1/ozon/push"
PRICES_PATH = "/v1/events/prices"
TRACKING_PATH = "/v1/events/tracking"
POSTINGS_PATH = "/v1/postings"
DEFAULT_SPEED = 3600.0
DEFAULT_CONCURRENCY = 8
BATCH_ROWS = 500  # price or scan rows per request
BATCH_POSTINGS = 200  # posting objects per request (a few kB each)
DUE_WINDOW = 5000  # records looked ahead for what is due together
RETRY_STATUSES = frozenset({429, 502, 503, 504})

NEW_POSTING_PUSH = "TYPE_NEW_POSTING"
STATE_PUSH = "TYPE_STATE_CHANGED"
CANCELLED_PUSH = "TYPE_POSTING_CANCELLED"
DATE_CHANGE_PUSH = "TYPE_DELIVERY_DATE_CHANGED"

# Ozon's mapping of push substates to Seller API statuses (its push documentation's table).
STATUS_OF_STATE: dict[str, str] = {
    "posting_acceptance_in_progress": "acceptance_in_progress",
    "posting_created": "awaiting_packaging",
    "posting_awaiting_registration": "awaiting_registration",
    "posting_transferring_to_delivery": "awaiting_deliver",
    "posting_in_carriage": "awaiting_deliver",
    "posting_not_in_carriage": "awaiting_deliver",
    "posting_in_arbitration": "arbitration",
    "posting_in_client_arbitration": "client_arbitration",
    "posting_on_way_to_city": "delivering",
    "posting_transferred_to_courier_service": "delivering",
    "posting_in_courier_service": "delivering",
    "posting_on_way_to_pickup_point": "delivering",
    "posting_in_pickup_point": "delivering",
    "posting_conditionally_delivered": "delivering",
    "posting_driver_pick_up": "driver_pickup",
    "posting_delivered": "delivered",
    "posting_received": "delivered",
    "posting_canceled": "cancelled",
}
ORDERED_STATUS = "awaiting_packaging"

# Record kinds, in the order records of one moment are sent.
POSTING, PUSH, PRICE, SCAN = "posting", "push", "price", "scan"
KINDS = (POSTING, PUSH, PRICE, SCAN)
_KIND_RANK = {kind: rank for rank, kind in enumerate(KINDS)}
_KIND_NAMES = {POSTING: "posting objects", PUSH: "pushes", PRICE: "price rows", SCAN: "scans"}

# Phases of a replay: records before ``since`` (sent at once), the paced records, and the
# snapshots of postings still open at the end.
CATCH_UP, PACED, END = 0, 1, 2
_PHASE_NAMES = {CATCH_UP: "catch-up", PACED: "replay", END: "open postings' snapshots"}

# The keys that date a push of a type the predictor does not use (chats, stocks, ...).
_ANY_PUSH_TIME_KEYS = ("changed_state_date", "in_process_at", "changed_at", "created_at")


# --- times ----------------------------------------------------------------------------------------


def push_event_time(push: Mapping[str, Any]) -> int | None:
    """When a push happened: its type's own time keys, else its ``received_at``; a push of a
    type the ingestion does not read may also be dated by its ``created_at`` and the like."""
    message_type = push.get("message_type")
    for key in PUSH_TIME_KEYS.get(str(message_type), ()):
        at = read_moment(push.get(key))
        if at is not None:
            return at
    at = read_moment(push.get(RECEIVED_AT))
    if at is not None or message_type in PUSH_SPECS:
        return at
    for key in _ANY_PUSH_TIME_KEYS:
        at = read_moment(push.get(key))
        if at is not None:
            return at
    return None


_Timed = tuple[int, int, Mapping[str, Any]]  # a push's time, its position, the push


def _timed_pushes(pushes: Iterable[Mapping[str, Any]]) -> list[_Timed]:
    """(time, position, push) of the pushes that have a time, in time then file order."""
    timed = [
        (at, k, push) for k, push in enumerate(pushes) if (at := push_event_time(push)) is not None
    ]
    timed.sort(key=lambda item: (item[0], item[1]))
    return timed


# --- the posting as the poller saw it -------------------------------------------------------------


def closing_time(
    snapshot: Mapping[str, Any], own_pushes: Sequence[Mapping[str, Any]]
) -> int | None:
    """When the posting closed, as the loader resolves it: its first cancellation push (a
    cancelled snapshot) or first delivery push (a delivered one); for an open snapshot the
    earlier of the two. None when no push says so."""
    return _closing_time(snapshot, _timed_pushes(own_pushes))


def _closing_time(snapshot: Mapping[str, Any], timed: Sequence[_Timed]) -> int | None:
    cancelled = [at for at, _, push in timed if _is_cancel(push)]
    delivered = [at for at, _, push in timed if _is_delivery(push)]
    status = snapshot.get("status")
    if status == "cancelled":
        return min(cancelled, default=None)
    if status == "delivered":
        return min(delivered, default=None)
    return min([*cancelled[:1], *delivered[:1]], default=None)


def _is_cancel(push: Mapping[str, Any]) -> bool:
    return push.get("message_type") == CANCELLED_PUSH


def _is_delivery(push: Mapping[str, Any]) -> bool:
    return push.get("message_type") == STATE_PUSH and push.get("new_state") in DELIVERED_STATES


def _state_of(push: Mapping[str, Any]) -> str | None:
    message_type = push.get("message_type")
    if message_type == NEW_POSTING_PUSH:
        return "posting_created"
    if message_type == STATE_PUSH:
        state = push.get("new_state")
    elif message_type == CANCELLED_PUSH:
        state = push.get("new_state") or "posting_canceled"
    else:
        return None
    return state if isinstance(state, str) and state else None


def _emptied(value: Any) -> Any:
    """A field of a cancellation as the API gives it for a posting not cancelled."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0
    if isinstance(value, str):
        return ""
    return None


EMPTY_CANCELLATION: dict[str, Any] = {
    "cancel_reason_id": 0,
    "cancel_reason": "",
    "cancellation_type": "",
    "cancelled_after_ship": False,
    "affect_cancellation_rating": False,
    "cancellation_initiator": "",
}


def posting_as_polled(
    snapshot: Mapping[str, Any], own_pushes: Sequence[Mapping[str, Any]], moment_ns: int
) -> dict[str, Any]:
    """The posting object the Seller API gave at ``moment_ns``, from the export's ``snapshot``
    and the posting's own pushes (dated as the archive dates them).

    From the posting's closing push on (a cancelled or delivered snapshot), the snapshot itself.
    Before it, the snapshot rolled back: ``status`` from the latest state push at or before the
    moment by Ozon's mapping (``awaiting_packaging`` before any; a substate the mapping does not
    know is kept as it is; never further on than the snapshot's own status), ``cancellation``
    emptied (as the API gives it for a posting not cancelled, and the FBO ``cancel_reason_id``
    likewise), ``delivering_date`` only if at or before the moment, and the promise
    (``analytics_data.delivery_date_begin/end``) the old one of the first delivery-date change
    after the moment, if any. The snapshot is not changed.
    """
    timed = _timed_pushes(own_pushes)
    return _as_polled(snapshot, timed, _closing_time(snapshot, timed), moment_ns)


def _as_polled(
    snapshot: Mapping[str, Any], timed: Sequence[_Timed], closed_at: int | None, moment_ns: int
) -> dict[str, Any]:
    """:func:`posting_as_polled` with the pushes timed and the closing time found."""
    closed = snapshot.get("status") in TERMINAL_STATUSES and closed_at is not None
    if closed and moment_ns >= closed_at:  # type: ignore[operator]
        return dict(snapshot)
    status: Any = ORDERED_STATUS
    for at, _, push in timed:
        if at > moment_ns:
            break
        state = _state_of(push)
        if state is not None:
            status = STATUS_OF_STATE.get(state, state)
    final = snapshot.get("status")
    if STATUS_PROGRESS.get(str(status), 0) > STATUS_PROGRESS.get(str(final), 0):
        status = final  # the export's snapshot is later news: the poller never saw beyond it
    polled = dict(snapshot)
    polled["status"] = status
    cancellation = snapshot.get("cancellation")
    if isinstance(cancellation, Mapping):
        polled["cancellation"] = {
            **EMPTY_CANCELLATION,
            **{key: _emptied(value) for key, value in cancellation.items()},
        }
    if "cancel_reason_id" in snapshot:
        polled["cancel_reason_id"] = _emptied(snapshot["cancel_reason_id"])
    if "delivering_date" in snapshot:
        handed_at = read_moment(snapshot.get("delivering_date"))
        if handed_at is None or handed_at > moment_ns:
            polled["delivering_date"] = None
    analytics = snapshot.get("analytics_data")
    if isinstance(analytics, Mapping):
        change = next(
            (
                push
                for at, _, push in timed
                if at > moment_ns and push.get("message_type") == DATE_CHANGE_PUSH
            ),
            None,
        )
        if change is not None:
            polled["analytics_data"] = {
                **analytics,
                "delivery_date_begin": change.get("old_delivery_date_begin"),
                "delivery_date_end": change.get("old_delivery_date_end"),
            }
    return polled


# --- reading the history --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimedRecord:
    """One record to send: its event time (UTC ns), kind, body and where it comes from."""

    at: int
    kind: str  # posting, push, price or scan
    body: dict[str, Any]
    file: str
    line: int
    phase: int = PACED  # CATCH_UP (before since: sent at once), PACED, END

    @property
    def catch_up(self) -> bool:
        return self.phase == CATCH_UP


@dataclass
class _Posting:
    snapshot: dict[str, Any]
    file: str
    line: int
    timed: list[_Timed] = field(default_factory=list)  # its own pushes


@dataclass
class Timeline:
    """What :func:`build_timeline` found: the records in sending order, and what it left out."""

    records: list[TimedRecord]
    skipped: Counter[str]
    end_at: int | None  # the latest record time of the history


def _json_lines(path: Path, skipped: Counter[str]) -> list[tuple[int, Any]]:
    """(line, value) of each non-blank line; lines that are not JSON are counted and left out."""
    if not path.is_file():
        return []
    values = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if number == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            try:
                values.append((number, orjson.loads(line)))
            except orjson.JSONDecodeError:
                skipped[f"{path.name}: line that is not JSON"] += 1
                logger.warning("%s:%d is not JSON: not sent", path.name, number)
    return values


def _csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a side CSV, read as the loader reads it: its separator, the header trimmed
    and lower-cased, cells trimmed, blank rows dropped; the header is line 1."""
    if not path.is_file():
        return []
    raw = path.read_bytes().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1251", errors="replace")
    handle = io.StringIO(text, newline="")
    separator = csv_separator(handle.readline())
    handle.seek(0)
    reader = csv.reader(handle, delimiter=separator)
    header = [name.strip().lower() for name in next(reader, [])]
    rows = []
    start = reader.line_num + 1
    for values in reader:
        if any(value.strip() for value in values):
            rows.append((start, dict(zip(header, (v.strip() for v in values), strict=False))))
        start = reader.line_num + 1
    return rows


def _read_postings(directory: Path, skipped: Counter[str]) -> dict[str, _Posting]:
    """Per posting number, the object the loader's merge lets win (the most progressed, then
    the one read last), from the saved replies and then ``postings.jsonl``."""
    found: list[tuple[Any, str, int]] = []
    for path in sorted(p for p in directory.glob(POSTINGS_JSON_GLOB) if p.is_file()):
        try:
            reply = build_reply_postings(orjson.loads(path.read_bytes().removeprefix(BOM)))
        except orjson.JSONDecodeError:
            skipped[f"{path.name}: not JSON"] += 1
            continue
        if not isinstance(reply, str):
            found += [(posting, path.name, k) for k, posting in enumerate(reply[0], start=1)]
    found += [
        (posting, POSTINGS_JSONL, line)
        for line, posting in _json_lines(directory / POSTINGS_JSONL, skipped)
    ]
    winners: dict[str, _Posting] = {}
    for posting, file, line in found:
        number = posting.get("posting_number") if isinstance(posting, dict) else None
        if number is None or number == "":
            skipped["posting object without a posting_number"] += 1
            continue
        held = winners.get(str(number))
        progress = STATUS_PROGRESS.get(str(posting.get("status")), 0)
        if held is None or progress >= STATUS_PROGRESS.get(str(held.snapshot.get("status")), 0):
            if held is not None:
                skipped["older duplicate posting object (merged, as the loader does)"] += 1
            winners[str(number)] = _Posting(posting, file, line)
        else:
            skipped["older duplicate posting object (merged, as the loader does)"] += 1
    return winners


def _offers_of(snapshot: Mapping[str, Any]) -> tuple[set[str], set[int]]:
    offers: set[str] = set()
    skus: set[int] = set()
    for product in snapshot.get("products") or ():
        if isinstance(product, dict):
            if product.get("offer_id") not in (None, ""):
                offers.add(str(product["offer_id"]))
            if isinstance(product.get("sku"), int):
                skus.add(product["sku"])
    return offers, skus


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def since_ns(since: str | datetime | int | None) -> int | None:
    """``since`` as UTC nanoseconds (a naive moment is UTC, as in the history files)."""
    if since is None or isinstance(since, int):
        return since
    if isinstance(since, datetime):
        moment = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        return (moment - _EPOCH) // timedelta(microseconds=1) * 1000
    at = read_moment(since)
    if at is None:
        raise ValueError(f"since must be an ISO-8601 moment, not {since!r}")
    return at


def build_timeline(
    history_dir: str | Path, since: str | datetime | int | None = None
) -> list[TimedRecord]:
    """The history's records to send, in sending order (see the module docstring)."""
    return read_timeline(history_dir, since).records


def read_timeline(history_dir: str | Path, since: str | datetime | int | None = None) -> Timeline:
    """:func:`build_timeline` with the records left out (no time, duplicates) counted."""
    directory = Path(history_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"history directory {directory} does not exist")
    since_at = since_ns(since)
    skipped: Counter[str] = Counter()
    postings = _read_postings(directory, skipped)

    push_lines = _json_lines(directory / PUSHES_JSONL, skipped)
    values = [value for _, value in push_lines]
    dated = with_receipt_times(values)
    next_at = next_push_times(values)
    pushes: list[tuple[int, int, dict[str, Any]]] = []  # (at, line, push)
    for position, ((line, _), push) in enumerate(zip(push_lines, dated, strict=True)):
        if not isinstance(push, dict):
            skipped["push that is not a JSON object"] += 1
            continue
        at = push_event_time(push)
        if at is None and push.get("message_type") not in PUSH_SPECS:
            # A type the ingestion does not read, without a time (a shipment deadline change):
            # it arrived before the next timestamped push, and goes with that receipt time.
            at = read_moment(next_at[position])
            if at is not None:
                push = {**push, RECEIVED_AT: next_at[position]}
        if at is None:
            skipped["push without a time"] += 1
            logger.warning("%s:%d has no time: not sent", PUSHES_JSONL, line)
            continue
        pushes.append((at, line, push))
        number = push.get("posting_number")
        if number not in (None, "") and str(number) in postings:
            postings[str(number)].timed.append((at, position, push))

    prices = _dated_rows(directory / PRICES_CSV, skipped, "price row")
    scans = _dated_rows(directory / TRACKING_CSV, skipped, "scan")

    ends = [at for at, _, _ in pushes] + [at for at, _, _ in prices] + [at for at, _, _ in scans]
    records: list[TimedRecord] = []
    selected: set[str] = set()
    finals: list[tuple[str, _Posting]] = []
    for number, posting in postings.items():
        snapshot = posting.snapshot
        ordered_at = read_moment(snapshot.get("in_process_at")) or read_moment(
            snapshot.get("created_at")
        )
        if ordered_at is None:
            skipped["posting object without a readable in_process_at"] += 1
            logger.warning("%s:%d has no order time: not sent", posting.file, posting.line)
            continue
        ends.append(ordered_at)
        timed = sorted(posting.timed, key=lambda item: (item[0], item[1]))
        closed_at = _closing_time(snapshot, timed)
        if since_at is not None and closed_at is not None and closed_at < since_at:
            continue  # closed before since (a posting ordered after since is never closed before)
        selected.add(number)
        moments = sorted(
            {ordered_at}
            | {
                at
                for at, _, push in timed
                if at > ordered_at and push.get("message_type") in (STATE_PUSH, CANCELLED_PUSH)
            }
        )
        sent: dict[str, Any] | None = None
        for moment in moments:
            polled = _as_polled(snapshot, timed, closed_at, moment)
            if polled != sent:
                records.append(TimedRecord(moment, POSTING, polled, posting.file, posting.line))
                sent = polled
        if sent != snapshot:
            finals.append((number, posting))

    end_at = max(ends, default=None)
    offers: set[str] = set()
    skus: set[int] = set()
    if since_at is not None:
        for number in selected:
            held_offers, held_skus = _offers_of(postings[number].snapshot)
            offers |= held_offers
            skus |= held_skus

    def wanted_push(at: int, push: dict[str, Any]) -> bool:
        if since_at is None:
            return True
        number = push.get("posting_number")
        if number not in (None, ""):
            return str(number) in selected or (str(number) not in postings and at >= since_at)
        if push.get("offer_id") not in (None, "") or push.get("product_id") is not None:
            sku = push.get("product_id")
            return str(push.get("offer_id")) in offers or (isinstance(sku, int) and sku in skus)
        return at >= since_at

    records += [
        TimedRecord(at, PUSH, push, PUSHES_JSONL, line)
        for at, line, push in pushes
        if wanted_push(at, push)
    ]
    records += [
        TimedRecord(at, PRICE, _price_body(row), PRICES_CSV, line)
        for at, line, row in prices
        if since_at is None or row.get("offer_id") in offers
    ]
    records += [
        TimedRecord(at, SCAN, _scan_body(row), TRACKING_CSV, line)
        for at, line, row in scans
        if since_at is None
        or row.get("posting_number") in selected
        or (row.get("posting_number") not in postings and at >= since_at)
    ]
    if since_at is not None:
        records = [
            record if record.at >= since_at else _with_phase(record, CATCH_UP) for record in records
        ]
    # end_at is known when there are finals: their order times are among its candidates.
    records += [
        TimedRecord(end_at or 0, POSTING, posting.snapshot, posting.file, posting.line, END)
        for _, posting in finals
    ]
    records.sort(key=lambda r: (r.phase, r.at, _KIND_RANK[r.kind]))
    return Timeline(records, skipped, end_at)


def _with_phase(record: TimedRecord, phase: int) -> TimedRecord:
    return TimedRecord(record.at, record.kind, record.body, record.file, record.line, phase)


def _dated_rows(
    path: Path, skipped: Counter[str], what: str
) -> list[tuple[int, int, dict[str, str]]]:
    rows = []
    for line, row in _csv_rows(path):
        at = read_moment(row.get("at"))
        if at is None:
            skipped[f"{what} without a readable at"] += 1
            logger.warning("%s:%d has no readable time: not sent", path.name, line)
            continue
        rows.append((at, line, row))
    return rows


def _price_body(row: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {key: row.get(key, "") for key in ("offer_id", "at", "price")}
    for key in ("old_price", "currency_code"):
        if row.get(key):
            body[key] = row[key]
    return body


def _scan_body(row: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {key: row.get(key, "") for key in ("posting_number", "at", "status")}
    if row.get("location"):
        body["location"] = row["location"]
    return body


# --- sending --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefusedRequest:
    """A request the service refused (or that never got through), with where its records are."""

    kind: str
    file: str
    lines: tuple[int, ...]
    status: int | None  # None: no answer (connection errors until the retries ran out)
    body: str
    records: int

    def format(self) -> str:
        first, last = min(self.lines), max(self.lines)
        where = f"{self.file}:{first}" + (f"-{last}" if last != first else "")
        status = "no answer" if self.status is None else f"HTTP {self.status}"
        return f"{where} ({self.records} {_KIND_NAMES[self.kind]}): {status}: {self.body[:300]}"


@dataclass
class ReplayReport:
    """What a replay sent, what was refused, and how fast it went."""

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    caught_up: int = 0  # of the records sent, those before ``since``
    requests: int = 0
    retries: int = 0
    duplicates: int = 0
    refused: int = 0  # records refused
    refusals: list[RefusedRequest] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # records not sent, by reason
    stopped: str | None = None  # why the replay stopped early (the service stayed away)
    unsent: int = 0  # records not sent because it stopped
    elapsed_seconds: float = 0.0

    @property
    def records_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def events_per_second(self) -> float:
        return self.records_sent / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.refused == 0 and self.stopped is None

    def format(self, max_refusals: int = 20) -> str:
        kinds = ", ".join(f"{self.sent[kind]} {_KIND_NAMES[kind]}" for kind in KINDS)
        lines = [
            f"sent {self.records_sent} records in {self.elapsed_seconds:.1f} s "
            f"({self.events_per_second:,.0f} events/s): {kinds}",
            f"requests: {self.requests}, retries: {self.retries}, "
            f"duplicates: {self.duplicates}, refused: {self.refused}",
        ]
        if self.caught_up:
            lines.append(f"caught up: {self.caught_up} records from before --since")
        if self.stopped is not None:
            lines.append(f"stopped early, {self.unsent} records not sent: {self.stopped}")
        lines += [f"not sent: {count} {reason}" for reason, count in sorted(self.skipped.items())]
        lines += [f"refused: {refusal.format()}" for refusal in self.refusals[:max_refusals]]
        if len(self.refusals) > max_refusals:
            lines.append(f"... and {len(self.refusals) - max_refusals} more refused requests")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Options:
    base_url: str
    push_path: str
    speed: float
    concurrency: int
    api_key: str | None
    push_secret: str | None
    max_attempts: int
    retry_backoff: float
    timeout_seconds: float

    def url(self, kind: str) -> str:
        path = {
            PUSH: self.push_path,
            PRICE: PRICES_PATH,
            SCAN: TRACKING_PATH,
            POSTING: POSTINGS_PATH,
        }[kind]
        return self.base_url.rstrip("/") + path

    def headers(self, kind: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if kind == PUSH:
            if self.push_secret:
                headers["X-Push-Secret"] = self.push_secret
        elif self.api_key:
            headers["X-API-Key"] = self.api_key
        return headers


def _request_body(batch: Sequence[TimedRecord]) -> bytes:
    kind = batch[0].kind
    if kind == PUSH:
        return orjson.dumps(batch[0].body)
    key = "postings" if kind == POSTING else "rows"
    return orjson.dumps({key: [record.body for record in batch]})


def _reply_counts(reply: bytes, records: int) -> tuple[int, list[tuple[int | None, str]]]:
    """The duplicates an accepted request's reply tells of, and the records it rejected
    (their index in the request when it says, and why)."""
    try:
        data = orjson.loads(reply) if reply else None
    except orjson.JSONDecodeError:
        return 0, []
    if not isinstance(data, dict):
        return 0, []
    duplicates = data.get("duplicates")
    if isinstance(duplicates, bool) or not isinstance(duplicates, int):
        single = data.get("duplicate") is True or data.get("stored") is False
        duplicates = 1 if records == 1 and single else 0
    found = data.get("rejected")
    rejected: list[tuple[int | None, str]] = []
    if isinstance(found, int) and not isinstance(found, bool):
        rejected = [(None, "rejected by the service")] * found
    elif isinstance(found, list):
        for item in found:
            index = item.get("index") if isinstance(item, dict) else None
            reason = item.get("reason", item) if isinstance(item, dict) else item
            valid = isinstance(index, int) and 0 <= index < records
            rejected.append((index if valid else None, str(reason)))
    return duplicates, rejected


class _Sender:
    """At most ``concurrency`` requests in flight, each retried while the service is away."""

    def __init__(
        self, session: Any, options: _Options, report: ReplayReport, progress: Progress
    ) -> None:
        self._session = session
        self._options = options
        self._report = report
        self._progress = progress
        self._slots = asyncio.Semaphore(options.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped: str | None = None

    async def submit(self, batch: Sequence[TimedRecord]) -> bool:
        """Send ``batch`` once a slot is free; False (nothing sent) once the sender stopped."""
        await self._slots.acquire()
        if self.stopped is not None:
            self._slots.release()
            return False
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def _send(self, batch: Sequence[TimedRecord]) -> None:
        try:
            status, reply = await self._post(batch)
            self._account(batch, status, reply)
        finally:
            self._slots.release()
            self._progress.advance(len(batch))

    async def _post(self, batch: Sequence[TimedRecord]) -> tuple[int | None, bytes]:
        import aiohttp

        options = self._options
        kind = batch[0].kind
        url, headers, body = options.url(kind), options.headers(kind), _request_body(batch)
        attempt = 0
        while True:
            attempt += 1
            self._report.requests += 1
            try:
                async with self._session.post(url, data=body, headers=headers) as response:
                    reply = await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError) as exc:
                status, reply, retry_after = None, f"{type(exc).__name__}: {exc}".encode(), None
            retry = status is None or status in RETRY_STATUSES
            if not retry or attempt >= options.max_attempts:
                return status, reply
            self._report.retries += 1
            delay = min(30.0, options.retry_backoff * 2 ** (attempt - 1))
            with contextlib.suppress(TypeError, ValueError):
                delay = min(30.0, max(delay, float(retry_after)))  # type: ignore[arg-type]
            logger.debug("%s %s: retrying in %.2f s", url, status or "no answer", delay)
            await asyncio.sleep(delay)

    def _account(self, batch: Sequence[TimedRecord], status: int | None, reply: bytes) -> None:
        report = self._report
        kind = batch[0].kind
        text = reply.decode("utf-8", errors="replace")
        refusals: list[RefusedRequest] = []
        if status is not None and 200 <= status < 300:
            duplicates, rejected = _reply_counts(reply, len(batch))
            report.sent[kind] += len(batch) - len(rejected)
            report.caught_up += sum(record.catch_up for record in batch)
            report.duplicates += duplicates
            unplaced = 0
            for index, reason in rejected:
                if index is None:
                    unplaced += 1
                else:
                    record = batch[index]
                    refusals.append(
                        RefusedRequest(kind, record.file, (record.line,), status, reason, 1)
                    )
            if unplaced:
                lines = tuple(record.line for record in batch)
                refusals.append(RefusedRequest(kind, batch[0].file, lines, status, text, unplaced))
        else:
            lines = tuple(record.line for record in batch)
            refusals.append(RefusedRequest(kind, batch[0].file, lines, status, text, len(batch)))
            if status is None or status in RETRY_STATUSES:
                # The service stayed away through every retry: sending on would only pile up
                # more of the same, so the replay stops.
                away = "unreachable" if status is None else f"answering {status}"
                self.stopped = self.stopped or (
                    f"{self._options.url(kind)} still {away} after "
                    f"{self._options.max_attempts} attempts"
                )
        for refusal in refusals:
            report.refused += refusal.records
            report.refusals.append(refusal)
            logger.error("refused: %s", refusal.format())


class _Pacer:
    """When a record is due: ``speed`` seconds of history per second of wall time."""

    def __init__(self, speed: float) -> None:
        self._speed = speed
        self._origin: tuple[float, int] | None = None

    def start(self, origin_at: int) -> None:
        if self._origin is None:
            self._origin = (time.monotonic(), origin_at)

    def due(self, record: TimedRecord) -> float:
        """The monotonic time ``record`` is due at (-inf: now)."""
        if self._speed == 0 or record.phase == CATCH_UP or self._origin is None:
            return float("-inf")
        wall, origin_at = self._origin
        return wall + (record.at - origin_at) / 1e9 / self._speed


def _requests(due: Sequence[TimedRecord]) -> list[list[TimedRecord]]:
    """The records due together as requests: each push alone, the other kinds in batches of
    up to their limit, in the order of each request's first record."""
    requests: list[list[TimedRecord]] = []
    open_batch: dict[str, list[TimedRecord]] = {}
    for record in due:
        if record.kind == PUSH:
            requests.append([record])
            continue
        batch = open_batch.get(record.kind)
        if batch is None:
            batch = open_batch[record.kind] = []
            requests.append(batch)
        batch.append(record)
        if len(batch) >= (BATCH_POSTINGS if record.kind == POSTING else BATCH_ROWS):
            del open_batch[record.kind]
    return requests


async def _dispatch(
    records: Sequence[TimedRecord],
    sender: _Sender,
    pacer: _Pacer,
    since_at: int | None,
    progress: Progress,
) -> int:
    """Submit the records in order, each when due; returns how many were not sent (when the
    sender stopped)."""
    phase: int | None = None
    i, n = 0, len(records)
    while i < n:
        record = records[i]
        if record.phase != phase:
            # Every earlier request finishes before a new phase starts: the final snapshots
            # come after the records of their postings, and the paced replay after the catch-up.
            await sender.drain()
            if phase is not None:
                progress.end()
            phase = record.phase
            total = sum(1 for r in records[i:] if r.phase == phase)
            progress.begin(_PHASE_NAMES[phase], total)
            if phase != CATCH_UP:
                pacer.start(since_at if since_at is not None else record.at)
        wait = pacer.due(record) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # Everything due by now goes out together: pushes one per request (as Ozon sends
        # them), the other kinds in batches (the book does not depend on the order).
        j = i + 1
        now = time.monotonic()
        while (
            j < n
            and j - i < DUE_WINDOW
            and records[j].phase == phase
            and pacer.due(records[j]) <= now
        ):
            j += 1
        sent = 0
        for batch in _requests(records[i:j]):
            if not await sender.submit(batch):
                break
            sent += len(batch)
        i += sent
        if i < j:
            break
    await sender.drain()
    if phase is not None:
        progress.end()
    return n - i


async def send_timeline(
    records: Sequence[TimedRecord],
    base_url: str,
    *,
    speed: float = DEFAULT_SPEED,
    since: str | datetime | int | None = None,
    api_key: str | None = None,
    push_secret: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    push_path: str = DEFAULT_PUSH_PATH,
    max_attempts: int = 10,
    retry_backoff: float = 0.5,
    timeout_seconds: float = 60.0,
    progress: Progress | None = None,
) -> ReplayReport:
    """Send ``records`` (in sending order, as :func:`build_timeline` gives them) to the service."""
    import aiohttp

    options = _Options(
        base_url,
        push_path,
        speed,
        concurrency,
        api_key,
        push_secret,
        max_attempts,
        retry_backoff,
        timeout_seconds,
    )
    _check_options(options)
    report = ReplayReport()
    progress = progress or Progress()
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sender = _Sender(session, options, report, progress)
        try:
            report.unsent = await _dispatch(
                records, sender, _Pacer(speed), since_ns(since), progress
            )
        finally:
            await sender.drain()
        report.stopped = sender.stopped
    report.elapsed_seconds = time.perf_counter() - started
    return report


def _check_options(options: _Options) -> None:
    if not options.base_url.startswith(("http://", "https://")):
        raise ValueError(f"the service URL must start with http:// or https://: {options.base_url}")
    if not options.push_path.startswith("/"):
        raise ValueError(f"the push path must start with /: {options.push_path!r}")
    if options.speed < 0:
        raise ValueError(f"speed must be 0 (as fast as possible) or more, not {options.speed}")
    if options.concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {options.concurrency}")
    if options.max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {options.max_attempts}")


def replay_history(
    history_dir: str | Path,
    base_url: str,
    *,
    speed: float = DEFAULT_SPEED,
    since: str | datetime | int | None = None,
    api_key: str | None = None,
    push_secret: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    push_path: str = DEFAULT_PUSH_PATH,
    max_attempts: int = 10,
    retry_backoff: float = 0.5,
    timeout_seconds: float = 60.0,
    progress: Progress | None = None,
) -> ReplayReport:
    """Read ``history_dir`` and send its records to the service at ``base_url`` (see the
    module docstring); returns what was sent, refused and left out."""
    _check_options(
        _Options(
            base_url,
            push_path,
            speed,
            concurrency,
            api_key,
            push_secret,
            max_attempts,
            retry_backoff,
            timeout_seconds,
        )
    )
    timeline = read_timeline(history_dir, since)
    for reason, count in sorted(timeline.skipped.items()):
        logger.warning("not sent: %d %s", count, reason)
    paced = [r.at for r in timeline.records if r.phase != CATCH_UP]
    if paced:
        start = since_ns(since) if since is not None else paced[0]
        span_hours = (paced[-1] - start) / 3.6e12
        logger.info(
            "%d records (%d to catch up), %.1f hours of history: about %s of wall time",
            len(timeline.records),
            len(timeline.records) - len(paced),
            span_hours,
            "no time at all" if speed == 0 else f"{span_hours * 3600 / speed / 60:.1f} minutes",
        )
    report = run_async(
        lambda: send_timeline(
            timeline.records,
            base_url,
            speed=speed,
            since=since,
            api_key=api_key,
            push_secret=push_secret,
            concurrency=concurrency,
            push_path=push_path,
            max_attempts=max_attempts,
            retry_backoff=retry_backoff,
            timeout_seconds=timeout_seconds,
            progress=progress,
        )
    )
    report.skipped = dict(timeline.skipped)
    return report


_T = TypeVar("_T")


def run_async(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to its end on a fresh event loop (uvloop where installed), in a thread of
    its own when this one already runs a loop (a notebook)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None

    def run() -> _T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(make())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    result: list[_T] = []
    failure: list[BaseException] = []

    def in_thread() -> None:
        try:
            result.append(run())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=in_thread, name="replay")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
