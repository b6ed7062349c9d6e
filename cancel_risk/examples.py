"""Score requests built from a history directory, as a seller's order system would send them.

For a posting and a moment ``as_of`` the request holds the posting object as the Seller API
gave it, its own pushes and the card-edit pushes of its offers, the price-log rows of its offers
and its carrier scans, all as they were known at ``as_of`` (optionally only the latest few of
each kind). Used by the benchmark, the tests and the demo's ``curl`` example::

    python -m cancel_risk.examples --history data/demo/history --out data/demo/request.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from core.ingest.events import DELIVERED_STATES, with_receipt_times
from core.ingest.history import POSTINGS_JSON_GLOB, build_reply_postings, csv_separator
from core.ingest.jsonlines import BOM
from core.ingest.postings import STATUS_PROGRESS
from core.ingest.values import NotCanonical, parse_timestamp
from core.tables import TERMINAL_STATUSES
from serving.request_lane import build_closing, parse_request

logger = logging.getLogger(__name__)

# Keys that hold an event's time, in the order the ingestion reads them.
_TIME_KEYS = ("changed_state_date", "in_process_at", "changed_at", "received_at", "at")
_FOREVER = 2**62
DATE_CHANGE_PUSH = "TYPE_DELIVERY_DATE_CHANGED"
CANCELLED_PUSH = "TYPE_POSTING_CANCELLED"
STATE_PUSH = "TYPE_STATE_CHANGED"
_WEEK = 7 * 86_400 * 1_000_000_000


@dataclass
class HistoryRecords:
    """A history directory's raw records, grouped by what a request about a posting needs."""

    postings: list[dict[str, Any]] = field(default_factory=list)
    pushes_by_posting: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    edits_by_offer: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    prices_by_offer: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    scans_by_posting: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                value = orjson.loads(line)
                if isinstance(value, dict):
                    yield value


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8-sig", newline="") as handle:
        separator = csv_separator(handle.readline())
        handle.seek(0)
        # As the loader reads the file: its separator, header names trimmed and lower-cased.
        reader = csv.reader(handle, delimiter=separator)
        header = [name.strip().lower() for name in next(reader, [])]
        for values in reader:
            if any(value.strip() for value in values):
                yield dict(zip(header, (value.strip() for value in values), strict=False))


def _reply_postings(directory: Path) -> Iterator[dict[str, Any]]:
    """The posting objects of the saved replies (``postings*.json``), in the loader's order."""
    for path in sorted(p for p in directory.glob(POSTINGS_JSON_GLOB) if p.is_file()):
        try:
            found = build_reply_postings(orjson.loads(path.read_bytes().removeprefix(BOM)))
        except orjson.JSONDecodeError:
            continue
        if not isinstance(found, str):
            yield from (posting for posting in found[0] if isinstance(posting, dict))


def load_history_records(history_dir: str | Path) -> HistoryRecords:
    """Read the posting objects (``postings*.json`` replies, then ``postings.jsonl``, the order
    the loader reads them in), ``pushes.jsonl``, ``prices.csv`` and ``tracking.csv`` as objects.

    The cabinet's ``orders.csv`` holds no posting objects: a seller's system cannot send its
    postings as the Seller API gives them.
    """
    directory = Path(history_dir)
    records = HistoryRecords(
        postings=[*_reply_postings(directory), *_json_lines(directory / "postings.jsonl")]
    )
    # Pushes that the archive dates by their neighbours get that time as their own.
    for push in with_receipt_times(list(_json_lines(directory / "pushes.jsonl"))):
        if push.get("posting_number"):
            records.pushes_by_posting[str(push["posting_number"])].append(push)
        elif push.get("offer_id"):
            records.edits_by_offer[str(push["offer_id"])].append(push)
    for row in _csv_rows(directory / "prices.csv"):
        records.prices_by_offer[str(row.get("offer_id"))].append(row)
    for row in _csv_rows(directory / "tracking.csv"):
        records.scans_by_posting[str(row.get("posting_number"))].append(row)
    return records


def latest_posting_objects(records: HistoryRecords) -> dict[str, dict[str, Any]]:
    """Per posting number, the object the loader's merge lets win: the most progressed status,
    then the one read last (the posting as the seller's system last polled it)."""
    winners: dict[str, tuple[int, dict[str, Any]]] = {}
    for posting in records.postings:
        number = posting.get("posting_number")
        if number is None or number == "":
            continue
        progress = STATUS_PROGRESS.get(str(posting.get("status")), 0)
        current = winners.get(str(number))
        if current is None or progress >= current[0]:
            winners[str(number)] = (progress, posting)
    return {number: posting for number, (_, posting) in winners.items()}


def _event_time(record: dict[str, Any]) -> int | None:
    for key in _TIME_KEYS:
        value = record.get(key)
        if value:
            try:
                return parse_timestamp(value)
            except NotCanonical:
                return None
    return None


def _known(records: Iterable[dict[str, Any]], as_of: int, latest: int | None) -> list[dict]:
    """The records timed at or before ``as_of`` (the latest ``latest`` of them), in time order."""
    timed = [(t, r) for r in records if (t := _event_time(r)) is not None and t <= as_of]
    timed.sort(key=lambda pair: pair[0])
    kept = [r for _, r in timed]
    return kept if latest is None else kept[-latest:]


def _closes(push: dict[str, Any]) -> bool:
    """Whether a push closes its posting (the loader's cancelled_at / delivered_at)."""
    message_type = push.get("message_type")
    if message_type == CANCELLED_PUSH:
        return True
    return message_type == STATE_PUSH and push.get("new_state") in DELIVERED_STATES


def build_score_request(
    records: HistoryRecords,
    posting: dict[str, Any],
    as_of: int,
    *,
    latest_per_kind: int | None = None,
    lang: str = "en",
    known_only: bool = True,
) -> dict[str, Any]:
    """The ``POST /v1/score`` body for ``posting`` at ``as_of`` (UTC ns).

    ``known_only=False`` keeps the events after ``as_of`` too (the service must ignore them);
    the posting's later delivery-date changes are kept either way (see below).
    """
    horizon = as_of if known_only else _FOREVER
    number = str(posting["posting_number"])
    offers = {str(p.get("offer_id")) for p in posting.get("products") or [] if isinstance(p, dict)}
    own_pushes = records.pushes_by_posting.get(number, ())
    pushes = _known(own_pushes, horizon, latest_per_kind)
    if known_only:
        later = [
            push for push in own_pushes if (at := _event_time(push)) is not None and at > as_of
        ]
        # The posting object is the export's snapshot: its promise already holds the delivery
        # dates of changes after as_of. Those changes' pushes (the service reads none of them
        # before their time) tell it the promise in force at as_of, as the archive tells the batch.
        pushes += [push for push in later if push.get("message_type") == DATE_CHANGE_PUSH]
        if posting.get("status") in TERMINAL_STATUSES:
            # Likewise its status may already say delivered or cancelled; the closing push tells
            # the service that this happened after as_of, so the posting was open then.
            pushes += [push for push in later if _closes(push)]
    for offer in sorted(offers):
        pushes += _known(records.edits_by_offer.get(offer, ()), horizon, latest_per_kind)
    prices = [
        row
        for offer in sorted(offers)
        for row in _known(records.prices_by_offer.get(offer, ()), horizon, latest_per_kind)
    ]
    scans = _known(records.scans_by_posting.get(number, ()), horizon, latest_per_kind)
    return {
        "posting": posting,
        "prices": prices,
        "pushes": pushes,
        "tracking": scans,
        "as_of": _iso(as_of),
        "lang": lang,
    }


def _iso(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=nanos // 1000)
    return moment.isoformat().replace("+00:00", "Z")


def open_score_requests(
    records: HistoryRecords,
    as_of: int,
    *,
    limit: int | None = None,
    latest_per_kind: int | None = None,
) -> list[dict[str, Any]]:
    """Requests for postings open at ``as_of`` according to their own records.

    Postings whose records are not in the canonical shape are skipped (the benchmark and the
    demo want ordinary requests); the service itself accepts them too.
    """
    requests = []
    for posting in records.postings:
        request = build_score_request(records, posting, as_of, latest_per_kind=latest_per_kind)
        try:
            parsed = parse_request(
                request["posting"], request["pushes"], request["prices"], request["tracking"]
            )
        except NotCanonical:
            continue
        if not build_closing(parsed).is_open(parsed.ordered_at, as_of):
            continue
        requests.append(request)
        if limit is not None and len(requests) >= limit:
            break
    return requests


def latest_moment(records: HistoryRecords) -> int:
    """The latest order time in the history (a moment when many postings are open)."""
    times = []
    for posting in records.postings:
        try:
            moment = parse_timestamp(posting.get("in_process_at"))
        except NotCanonical:
            continue
        if moment is not None:
            times.append(moment)
    if not times:
        raise ValueError("the history holds no posting with a readable in_process_at")
    return max(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a POST /v1/score body from a history.")
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--latest-per-kind", type=int, default=20)
    args = parser.parse_args(argv)
    records = load_history_records(args.history)
    as_of = latest_moment(records)
    requests = open_score_requests(records, as_of, latest_per_kind=args.latest_per_kind)
    if not requests:
        parser.error(f"no posting of {args.history} is open at its latest order time")
    # A posting of the last days with the most events: the example shows what the service reads.
    recent = [r for r in requests if parse_timestamp(r["posting"]["in_process_at"]) > as_of - _WEEK]
    request = max(
        recent or requests,
        key=lambda r: len(r["prices"]) + len(r["pushes"]) + len(r["tracking"]),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(request, ensure_ascii=False, indent=2), encoding="utf-8")
    number = request["posting"]["posting_number"]
    sys.stdout.write(f"wrote {args.out} (posting {number})\n")


if __name__ == "__main__":
    main()
