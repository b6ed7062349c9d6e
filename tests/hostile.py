"""A corpus of hostile inputs: each case writes one kind of bad data into a valid history.

Every case starts from a copy of a small simulated shop (:func:`build_base_histories`, in both
the API JSON Lines and the cabinet CSV format) and adds or damages records in the shapes a
seller's archive really gets them wrong: cut-off files, broken lines, a cp1251 export, missing
columns, conflicting duplicates, odd timestamps and prices, empty files, unknown message types.
The valid records stay beside the bad ones, and each case returns an :class:`Outcome` saying
what must come of it: which records are rejected (file, line, reason), which warnings are
given, whether the load or the scoring stops (and with what message), and which postings must
or must not be scored. ``tests/test_hostile.py`` checks the loader, ``cancel-risk score`` and
the REST service against it.

Nothing here is committed data: the corpus is written at test time (the 500 MB line too, by
:func:`append_huge_line`, streamed in blocks).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

BASE_SHOP = {"days": 40, "orders_per_day": 20, "seed": 23}
HUGE_LINE_BYTES = 500 * 2**20


@dataclass(frozen=True)
class BaseHistory:
    """A valid history in one format, and what a clean load of it gives."""

    directory: Path
    as_of: pd.Timestamp
    posting_numbers: frozenset[str]  # every posting kept
    open_postings: frozenset[str]  # open at as_of: what `cancel-risk score` must score
    postings_read: int
    events: int
    template: dict[str, Any]  # an API posting awaiting packaging: new postings copy it


@dataclass(frozen=True)
class BaseHistories:
    jsonl: BaseHistory
    csv: BaseHistory


@dataclass(frozen=True)
class Reject:
    """A reject the load must report: its file, line and (part of) its reason."""

    file: str
    line: int
    reason: str


@dataclass
class Outcome:
    """What a case wrote into its history, and what must come of it."""

    rejects: list[Reject] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # parts of warnings the load must give
    load_stops: str | None = None  # the load stops with a message holding this
    score_stops: str | None = None  # the load works, `cancel-risk score` stops with this
    score_args: tuple[str, ...] = ()  # a second run with these options must then succeed
    options: tuple[str, ...] = ()  # options of every `cancel-risk score` run of the case
    added: set[str] = field(default_factory=set)  # valid postings added: kept, scored if open
    not_scored: set[str] = field(default_factory=set)  # postings that must not be scored
    events_added: int = 0  # valid events added (negative: removed) beside the bad records
    same_scores_as_base: bool = False  # the values changed only in form: identical scores


Writer = Callable[[Path, BaseHistory], Outcome]


@dataclass(frozen=True)
class HostileCase:
    """One kind of hostile input; ``title`` is how the README table names it."""

    name: str
    title: str
    base: str  # "jsonl" or "csv"
    write: Writer


# --- the base histories ------------------------------------------------------------------------


def _cp1251_text(text: str) -> str:
    """The text as a cp1251 export can hold it: characters outside cp1251 become '?'."""
    return text.encode("cp1251", errors="replace").decode("cp1251")


def build_base_histories(root: Path) -> BaseHistories:
    """Simulate one small shop and write it as API JSON Lines and as the cabinet CSV.

    The CSV's text is limited to what cp1251 can hold (the simulated shop sells with Chinese
    names), so that the cp1251 case holds exactly the same text as its UTF-8 base.
    """
    from core.features import open_postings_at
    from core.ingest import load_history
    from simulator import SimulationConfig, simulate_shop, write_history

    world = simulate_shop(SimulationConfig(**BASE_SHOP))
    bases = {}
    for posting_format in ("jsonl", "csv"):
        directory = root / posting_format
        write_history(world, directory, posting_format=posting_format)
        if posting_format == "csv":
            orders = directory / "orders.csv"
            text = orders.read_text(encoding="utf-8-sig")
            orders.write_text(_cp1251_text(text), encoding="utf-8-sig")
        tables = load_history(directory)
        assert len(tables.rejects) == 0, tables.rejects
        as_of = tables.latest_event_at()
        bases[posting_format] = BaseHistory(
            directory=directory,
            as_of=as_of,
            posting_numbers=frozenset(tables.postings["posting_number"]),
            open_postings=frozenset(open_postings_at(tables, as_of)),
            postings_read=tables.report.postings_read,
            events=len(tables.events),
            template=_template(root / "jsonl" / "postings.jsonl"),
        )
    return BaseHistories(jsonl=bases["jsonl"], csv=bases["csv"])


def _template(postings: Path) -> dict[str, Any]:
    with postings.open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["status"] == "awaiting_packaging":
                return record
    raise AssertionError("the simulated shop has no posting awaiting packaging")


# --- writing helpers ---------------------------------------------------------------------------


def iso(moment: pd.Timestamp) -> str:
    return moment.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_posting(base: BaseHistory, number: str, **changes: Any) -> dict[str, Any]:
    """A valid API posting ordered three hours before ``as_of`` and still open, with changes.

    ``changes`` set top-level keys; ``price`` and ``quantity`` set its one product's.
    """
    record = copy.deepcopy(base.template)
    record.update(
        posting_number=number,
        order_number=number.rsplit("-", 1)[0],
        order_id=900_000_000 + sum(map(ord, number)),
        in_process_at=iso(base.as_of - pd.Timedelta(hours=3)),
        shipment_date=iso(base.as_of + pd.Timedelta(days=1)),
    )
    record["analytics_data"]["delivery_date_begin"] = iso(base.as_of + pd.Timedelta(days=10))
    record["analytics_data"]["delivery_date_end"] = iso(base.as_of + pd.Timedelta(days=14))
    record["products"] = record["products"][:1]
    for key in ("price", "quantity"):
        if key in changes:
            record["products"][0][key] = changes.pop(key)
    record.update(changes)
    return record


def dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False)


def count_lines(path: Path) -> int:
    """Physical lines of a file (a last line without a newline counts)."""
    data = path.read_bytes()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def append_lines(path: Path, lines: Iterable[str | bytes], *, newline_at_end: bool = True) -> int:
    """Append lines to a file; returns the 1-based line number of the first one."""
    first = count_lines(path) + 1
    encoded = [line if isinstance(line, bytes) else line.encode("utf-8") for line in lines]
    data = b"\n".join(encoded) + (b"\n" if newline_at_end else b"")
    with path.open("ab") as handle:
        handle.write(data)
    return first


def insert_lines(path: Path, after: int, lines: list[bytes]) -> int:
    """Insert raw lines after line ``after``; returns the line number of the first one."""
    old = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([*old[:after], *lines, *old[after:]]))
    return after + 1


def csv_line(values: list[str]) -> str:
    """One comma-separated row, quoted where needed (as the simulator's side files are)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()


def open_base_postings(base: BaseHistory, count: int) -> list[dict[str, Any]]:
    """The first ``count`` API records of postings open at ``as_of``, in file order."""
    found = []
    with (base.directory / "postings.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["posting_number"] in base.open_postings:
                found.append(record)
                if len(found) == count:
                    return found
    raise AssertionError(f"fewer than {count} open postings")


def append_huge_line(path: Path, size: int = HUGE_LINE_BYTES) -> tuple[int, int]:
    """Append one JSON object of about ``size`` bytes, written in 1 MiB blocks.

    It is a complete, valid posting object padded with one long string, so a reader that took
    the line whole would decode it (and hold gigabytes). Returns its line number and its
    length in bytes (without the newline).
    """
    first = count_lines(path) + 1
    block = b"x" * 2**20
    head = b'{"posting_number": "H-HUGE-1", "padding": "'
    tail = b'", "in_process_at": "2026-07-01T00:00:00Z", "products": []}'
    blocks = size // len(block)
    with path.open("ab") as handle:
        handle.write(head)
        for _ in range(blocks):
            handle.write(block)
        handle.write(tail + b"\n")
    return first, len(head) + blocks * len(block) + len(tail)


# --- the cases ---------------------------------------------------------------------------------


def truncated_json(directory: Path, base: BaseHistory) -> Outcome:
    """Files cut off mid-record, as a crash or a full disk leaves them."""
    postings = directory / "postings.jsonl"
    good = append_lines(postings, [dumps(new_posting(base, "H-TRUNC-OK-1"))])
    cut = dumps(new_posting(base, "H-TRUNC-1"))
    append_lines(postings, [cut[: len(cut) // 2]], newline_at_end=False)
    pushes = directory / "pushes.jsonl"
    push = {
        "message_type": "TYPE_STATE_CHANGED",
        "posting_number": "H-TRUNC-OK-1",
        "new_state": "posting_in_carriage",
    }
    push_line = append_lines(pushes, [dumps(push)[:40]], newline_at_end=False)
    reply = directory / "postings_page_9.json"
    reply.write_text(dumps({"result": {"postings": [new_posting(base, "H-TRUNC-2")]}})[:500])
    return Outcome(
        rejects=[
            Reject("postings.jsonl", good + 1, "not valid JSON (unexpected end of data)"),
            Reject("pushes.jsonl", push_line, "not valid JSON"),
            Reject("postings_page_9.json", 1, "file is not valid JSON"),
        ],
        added={"H-TRUNC-OK-1"},
        not_scored={"H-TRUNC-1", "H-TRUNC-2"},
    )


def broken_json_lines(directory: Path, base: BaseHistory) -> Outcome:
    """Lines that are not JSON, or not an object, in the middle of the files."""
    postings = directory / "postings.jsonl"
    first = insert_lines(
        postings,
        10,
        [
            b'{"posting_number": "H-BROKEN-1", "products": [}',
            b'\xff\xfe{"posting_number": "H-BROKEN-2"}',  # not UTF-8
            b"[" * 100_000,  # nested beyond any decoder's limit
            b"null",
            b'"a string"',
            dumps({"in_process_at": iso(base.as_of), "products": []}).encode(),
        ],
    )
    products = directory / "products.jsonl"
    card_line = insert_lines(products, 2, [b'{"offer_id": "SKU-X", ]'])
    return Outcome(
        rejects=[
            Reject("postings.jsonl", first, "not valid JSON"),
            Reject("postings.jsonl", first + 1, "not valid JSON"),
            Reject("postings.jsonl", first + 2, "not valid JSON"),
            Reject("postings.jsonl", first + 3, "not a JSON object"),
            Reject("postings.jsonl", first + 4, "not a JSON object"),
            Reject("postings.jsonl", first + 5, "no posting_number"),
            Reject("products.jsonl", card_line, "not valid JSON"),
        ],
        not_scored={"H-BROKEN-1", "H-BROKEN-2"},
    )


def cabinet_csv_in_cp1251(directory: Path, base: BaseHistory) -> Outcome:
    """The cabinet export saved by a spreadsheet in Windows-1251 instead of UTF-8."""
    orders = directory / "orders.csv"
    orders.write_bytes(orders.read_text(encoding="utf-8-sig").encode("cp1251"))
    return Outcome(warnings=["orders.csv is not UTF-8; read as cp1251"])


def csv_without_a_required_column(directory: Path, base: BaseHistory) -> Outcome:
    """The cabinet export without «Статус» (a column dropped in a spreadsheet)."""
    orders = directory / "orders.csv"
    rows = list(csv.reader(io.StringIO(orders.read_text(encoding="utf-8-sig")), delimiter=";"))
    drop = rows[0].index("Статус")
    kept = [row[:drop] + row[drop + 1 :] for row in rows]
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=";", quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(kept)
    orders.write_text(buffer.getvalue(), encoding="utf-8-sig")
    return Outcome(load_stops="orders.csv: required column «Статус» is missing")


def side_csv_without_a_required_column(directory: Path, base: BaseHistory) -> Outcome:
    """The price log with its ``price`` column misspelt."""
    prices = directory / "prices.csv"
    text = prices.read_text(encoding="utf-8")
    header, rest = text.split("\n", 1)
    prices.write_text(header.replace("price", "prise", 1) + "\n" + rest, encoding="utf-8")
    return Outcome(load_stops="prices.csv: required column 'price' is missing")


def duplicates_with_different_statuses(directory: Path, base: BaseHistory) -> Outcome:
    """The same posting again with other statuses: progress, contradiction and regression."""
    progressed, contradicted, regressed = open_base_postings(base, 3)
    delivered = {**progressed, "status": "delivered"}
    both = [{**contradicted, "status": "delivered"}, {**contradicted, "status": "cancelled"}]
    earlier = {**regressed, "status": "awaiting_registration"}
    postings = directory / "postings.jsonl"
    first = append_lines(postings, [dumps(r) for r in (delivered, *both, earlier)])
    number = contradicted["posting_number"]
    return Outcome(
        warnings=[
            f"1 posting has both a delivered and a cancelled record; the one read later is "
            f"kept: {number} (delivered in postings.jsonl line {first + 1}, cancelled in "
            f"postings.jsonl line {first + 2})"
        ],
        not_scored={progressed["posting_number"], number},
    )


_ZONED_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?)Z")


def _strip_zone(text: str) -> str:
    """ISO-8601 UTC timestamps written without their ``Z``."""
    return _ZONED_TIME.sub(r"\1", text)


def timestamps_without_time_zone(directory: Path, base: BaseHistory) -> Outcome:
    """Every other posting and push, and the whole price log, dated without a time zone."""
    for name in ("postings.jsonl", "pushes.jsonl"):
        path = directory / name
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text(
            "".join(_strip_zone(line) if k % 2 else line for k, line in enumerate(lines)),
            encoding="utf-8",
        )
    prices = directory / "prices.csv"
    prices.write_text(_strip_zone(prices.read_text(encoding="utf-8")), encoding="utf-8")
    return Outcome(same_scores_as_base=True)


def dates_before_2000(directory: Path, base: BaseHistory) -> Outcome:
    """Order times that are placeholders or a broken clock, beside the earliest valid one."""
    postings = directory / "postings.jsonl"
    first = append_lines(
        postings,
        [
            dumps(new_posting(base, "H-OLD-1", in_process_at="1999-12-31T23:59:59Z")),
            dumps(new_posting(base, "H-OLD-2", in_process_at="1970-01-01T00:00:00Z")),
            dumps(new_posting(base, "H-OLD-OK-1", in_process_at="2000-01-01T00:00:00Z")),
        ],
    )
    return Outcome(
        rejects=[
            Reject(
                "postings.jsonl", first, "in_process_at '1999-12-31T23:59:59Z' is before 2000-01-01"
            ),
            Reject(
                "postings.jsonl",
                first + 1,
                "in_process_at '1970-01-01T00:00:00Z' is before 2000-01-01",
            ),
        ],
        added={"H-OLD-OK-1"},
        not_scored={"H-OLD-1", "H-OLD-2"},
    )


def dates_in_the_future(directory: Path, base: BaseHistory) -> Outcome:
    """A posting ordered in 2099: it would move the scoring moment there."""
    postings = directory / "postings.jsonl"
    line = append_lines(
        postings, [dumps(new_posting(base, "H-FUTURE-1", in_process_at="2099-01-01T00:00:00Z"))]
    )
    return Outcome(
        score_stops=(
            "the latest timestamp in the history, 2099-01-01T00:00:00+00:00, is in the future "
            f"(ordered_at of posting H-FUTURE-1, postings.jsonl line {line})"
        ),
        score_args=("--as-of", iso(base.as_of)),
        added={"H-FUTURE-1"},
        not_scored={"H-FUTURE-1"},
    )


def _price_case(price: str, literal: str | None, reason: str, row_reason: str | None) -> Writer:
    """A posting with this price (also as a bare JSON number when ``literal``), and a price
    row with it; ``reason``/``row_reason`` None means the value is valid and kept."""

    def write(directory: Path, base: BaseHistory) -> Outcome:
        postings = directory / "postings.jsonl"
        number = f"H-PRICE-{'OK' if reason is None else 'BAD'}-1"
        lines = [dumps(new_posting(base, number, price=price))]
        if literal is not None:
            bare = dumps(new_posting(base, "H-PRICE-BARE-1", price="PLACEHOLDER"))
            lines.append(bare.replace('"PLACEHOLDER"', literal))
        first = append_lines(postings, lines)
        prices = directory / "prices.csv"
        offer = base.template["products"][0]["offer_id"]
        at = iso(base.as_of - pd.Timedelta(hours=1))
        row = append_lines(prices, [csv_line([offer, at, price, "", "CNY"])])
        outcome = Outcome()
        if reason is None:
            outcome.added.add(number)
        else:
            outcome.rejects.append(Reject("postings.jsonl", first, reason))
            outcome.not_scored.add(number)
        if literal is not None:
            outcome.rejects.append(Reject("postings.jsonl", first + 1, "not valid JSON"))
            outcome.not_scored.add("H-PRICE-BARE-1")
        if row_reason is None:
            outcome.events_added = 1
        else:
            outcome.rejects.append(Reject("prices.csv", row, row_reason))
        return outcome

    return write


def _quantity_case(quantity: int, reason: str) -> Writer:
    def write(directory: Path, base: BaseHistory) -> Outcome:
        postings = directory / "postings.jsonl"
        line = append_lines(postings, [dumps(new_posting(base, "H-QUANTITY-1", quantity=quantity))])
        return Outcome(
            rejects=[Reject("postings.jsonl", line, reason)], not_scored={"H-QUANTITY-1"}
        )

    return write


def empty_files(directory: Path, base: BaseHistory) -> Outcome:
    """Zero-byte and blank files next to the valid postings.

    The export moment was the time of the last price and scan rows, emptied here, so the
    scoring run is given it (``--as-of``) to score the same open postings.
    """
    side_rows = sum(count_lines(directory / name) - 1 for name in ("prices.csv", "tracking.csv"))
    (directory / "orders.csv").write_bytes(b"")
    (directory / "postings_page_1.json").write_bytes(b"\xef\xbb\xbf  \n")
    (directory / "prices.csv").write_bytes(b"")
    (directory / "tracking.csv").write_bytes(b"\n\n")
    (directory / "products.jsonl").write_bytes(b"")
    return Outcome(
        warnings=[
            f"{name} is empty: it holds no records"
            for name in (
                "orders.csv",
                "postings_page_1.json",
                "prices.csv",
                "tracking.csv",
                "products.jsonl",
            )
        ],
        events_added=-side_rows,
        options=("--as-of", iso(base.as_of)),
    )


def only_posting_file_empty(directory: Path, base: BaseHistory) -> Outcome:
    """The cabinet export, the only posting source, is a zero-byte file."""
    (directory / "orders.csv").write_bytes(b"")
    return Outcome(load_stops="orders.csv is empty")


def csv_line_of_20_mb(directory: Path, base: BaseHistory) -> Outcome:
    """One carrier-scan row of 20 MB (a runaway notes column), a valid row after it."""
    tracking = directory / "tracking.csv"
    number = next(iter(sorted(base.open_postings)))
    at = iso(base.as_of - pd.Timedelta(hours=2))
    line = append_lines(
        tracking,
        [csv_line([number, at, "x" * 20_000_000, "Москва"]), csv_line([number, at, "ok", ""])],
    )
    return Outcome(
        rejects=[
            Reject(
                "tracking.csv",
                line,
                "scan row: line is 20,000,0",  # the rest: its exact length and the limit
            )
        ],
        events_added=1,
    )


def unknown_push_types_and_statuses(directory: Path, base: BaseHistory) -> Outcome:
    """Push types, substates and posting statuses this version has never seen."""
    (target,) = open_base_postings(base, 1)
    number = target["posting_number"]
    at = iso(base.as_of - pd.Timedelta(hours=1))
    pushes = directory / "pushes.jsonl"
    first = append_lines(
        pushes,
        [
            dumps({"message_type": "TYPE_HOLOGRAM_SENT", "posting_number": number, "at": at}),
            dumps(
                {
                    "message_type": "TYPE_STATE_CHANGED",
                    "posting_number": number,
                    "new_state": "posting_teleported",
                    "changed_state_date": at,
                }
            ),
            dumps({"message_type": 42, "posting_number": number}),
        ],
    )
    postings = directory / "postings.jsonl"
    append_lines(postings, [dumps(new_posting(base, "H-STATUS-1", status="awaiting_teleport"))])
    return Outcome(
        rejects=[Reject("pushes.jsonl", first + 2, "push: no message_type")],
        warnings=["TYPE_HOLOGRAM_SENT (1)"],
        added={"H-STATUS-1"},
        events_added=1,
    )


def postings_without_products(directory: Path, base: BaseHistory) -> Outcome:
    postings = directory / "postings.jsonl"
    first = append_lines(
        postings,
        [
            dumps(new_posting(base, "H-NOPRODUCT-1", products=[])),
            dumps({k: v for k, v in new_posting(base, "H-NOPRODUCT-2").items() if k != "products"}),
            dumps(new_posting(base, "H-NOPRODUCT-3", products=None)),
            dumps(new_posting(base, "H-NOPRODUCT-4", products=[None])),
            dumps(new_posting(base, "H-NOPRODUCT-5", products="none")),
        ],
    )
    reasons = ["no products"] * 3 + ["product 1 is not an object", "no products"]
    return Outcome(
        rejects=[Reject("postings.jsonl", first + k, r) for k, r in enumerate(reasons)],
        not_scored={f"H-NOPRODUCT-{k}" for k in range(1, 6)},
    )


def too_many_rejects(directory: Path, base: BaseHistory) -> Outcome:
    """An export where one posting record in ten is cut off: not trusted for scoring."""
    bad = base.postings_read // 10
    postings = directory / "postings.jsonl"
    first = append_lines(postings, ['{"posting_number": "H-CUT-' + str(k) for k in range(bad)])
    return Outcome(
        rejects=[Reject("postings.jsonl", first + k, "not valid JSON") for k in range(bad)],
        score_stops=f"{bad} of {base.postings_read + bad} posting records were rejected",
    )


CASES: tuple[HostileCase, ...] = (
    HostileCase(
        "truncated_json", "truncated JSON (a line, a push, a reply file cut off)", "jsonl",
        truncated_json,
    ),
    HostileCase(
        "broken_json_lines",
        "broken JSON lines (syntax, bytes that are not UTF-8, 100,000-deep nesting, `null`, "
        "a string, no `posting_number`)",
        "jsonl",
        broken_json_lines,
    ),
    HostileCase("cp1251_cabinet_csv", "cabinet `orders.csv` in cp1251", "csv",
                cabinet_csv_in_cp1251),
    HostileCase(
        "csv_missing_required_column", "`orders.csv` without a required column (`Статус`)",
        "csv", csv_without_a_required_column,
    ),
    HostileCase(
        "side_csv_missing_required_column", "`prices.csv` without a required column (`price`)",
        "jsonl", side_csv_without_a_required_column,
    ),
    HostileCase(
        "duplicates_with_different_statuses",
        "duplicate posting numbers with different statuses",
        "jsonl",
        duplicates_with_different_statuses,
    ),
    HostileCase(
        "timestamps_without_time_zone", "timestamps without a time zone", "jsonl",
        timestamps_without_time_zone,
    ),
    HostileCase("dates_before_2000", "order dates before 2000", "jsonl", dates_before_2000),
    HostileCase("dates_in_the_future", "dates in the future (2099)", "jsonl",
                dates_in_the_future),
    HostileCase(
        "price_1_390_00", 'price `"1 390,00"`', "jsonl",
        _price_case("1 390,00", None, None, None),
    ),
    HostileCase(
        "price_nan", 'price `"NaN"` (and a bare `NaN`)', "jsonl",
        _price_case(
            "NaN", "NaN", "price 'NaN' of product 1 is not a number",
            "price row: price 'NaN' is not a number",
        ),
    ),
    HostileCase(
        "price_negative", 'price `"-5"`', "jsonl",
        _price_case(
            "-5", None, "price '-5' of product 1 is negative",
            "price row: price '-5' is negative or not finite",
        ),
    ),
    HostileCase(
        "price_1e309", 'price `"1e309"` (and a bare `1e309`)', "jsonl",
        _price_case(
            "1e309", "1e309", "price '1e309' of product 1 is not finite",
            "price row: price '1e309' is negative or not finite",
        ),
    ),
    HostileCase(
        "quantity_0", "quantity 0", "jsonl",
        _quantity_case(0, "quantity '0' of product 1 is not a positive integer"),
    ),
    HostileCase(
        "quantity_1e9", "quantity 10^9", "jsonl",
        _quantity_case(
            10**9,
            "quantity '1000000000' of product 1 is more than the 100,000 units a product line "
            "may hold",
        ),
    ),
    HostileCase(
        "empty_files",
        "empty files beside valid postings (`orders.csv`, `postings_page_1.json`, `prices.csv`, "
        "`tracking.csv`, `products.jsonl`)",
        "jsonl",
        empty_files,
    ),
    HostileCase(
        "only_posting_file_empty", "the only posting file empty (`orders.csv` of 0 bytes)", "csv",
        only_posting_file_empty,
    ),
    HostileCase("csv_line_of_20_mb", "a 20 MB line in a CSV (`tracking.csv`)", "jsonl",
                csv_line_of_20_mb),
    HostileCase(
        "unknown_push_types_and_statuses",
        "unknown push types, push substates and posting statuses",
        "jsonl",
        unknown_push_types_and_statuses,
    ),
    HostileCase(
        "postings_without_products",
        "postings with no products (`[]`, absent, `null`, `[null]`, a string)",
        "jsonl",
        postings_without_products,
    ),
    HostileCase(
        "too_many_rejects", "one posting record in ten cut off (over `--max-rejected-share`)",
        "jsonl", too_many_rejects,
    ),
)  # fmt: skip


# --- the same hostile values in a REST request -------------------------------------------------

DELETE = object()


def with_value(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with the value at ``path`` set (or removed, for ``DELETE``)."""
    changed = copy.deepcopy(body)
    target: Any = changed
    for part in path[:-1]:
        target = target[part]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


def _bare_number(body: dict[str, Any], literal: str) -> bytes:
    """The body with its first product's price written as a bare JSON ``literal``."""
    marked = with_value(body, ("posting", "products", 0, "price"), "PLACEHOLDER")
    return json.dumps(marked).replace('"PLACEHOLDER"', literal).encode()


def _without_zones(body: dict[str, Any]) -> dict[str, Any]:
    return json.loads(_strip_zone(json.dumps(body, indent=0)))


def _push(body: dict[str, Any], **push: Any) -> dict[str, Any]:
    """The body with one more push of its posting, first (so it dates no other push)."""
    number = body["posting"]["posting_number"]
    added = {"posting_number": number, "changed_state_date": body["as_of"], **push}
    return {**copy.deepcopy(body), "pushes": [added, *body["pushes"]]}


@dataclass(frozen=True)
class RequestCase:
    """A hostile request body, and what ``POST /v1/score`` must answer.

    ``build`` makes the body (a dict sent as JSON, or raw bytes) from a valid request. A 422
    names the field by ``loc`` with a message holding ``message``; a 200 is scored exactly as
    ``same_as(body)`` is, when given.
    """

    name: str
    corpus_case: str  # the HostileCase this mirrors
    build: Callable[[dict[str, Any]], dict[str, Any] | bytes]
    status: int
    loc: tuple[str | int, ...] = ()
    message: str = ""
    same_as: Callable[[dict[str, Any]], dict[str, Any]] | None = None


PRICE = ("posting", "products", 0, "price")
QUANTITY = ("posting", "products", 0, "quantity")
PRODUCTS = ("posting", "products")
ORDERED = ("posting", "in_process_at")

REQUEST_CASES: tuple[RequestCase, ...] = (
    RequestCase("truncated_body", "truncated_json", lambda b: json.dumps(b).encode()[:400], 422,
                ("body",), "the body is not valid JSON: unexpected end of data"),
    RequestCase("body_not_utf8", "broken_json_lines",
                lambda b: b'{"posting": {"posting_number": "\xff\xfe"}}', 422, ("body",),
                "the body is not valid JSON: str is not valid UTF-8"),
    RequestCase("body_nested_100000_deep", "broken_json_lines", lambda b: b"[" * 100_000, 422,
                ("body",), "the body is not valid JSON"),
    RequestCase("body_a_string", "broken_json_lines", lambda b: b'"a string"', 422, ("body",),
                "valid dictionary"),
    RequestCase("posting_null", "broken_json_lines",
                lambda b: with_value(b, ("posting",), None), 422, ("body", "posting"),
                "valid dictionary"),
    RequestCase("body_in_cp1251", "cp1251_cabinet_csv",
                lambda b: json.dumps(b, ensure_ascii=False).encode("cp1251", errors="replace"),
                422, ("body",), "the body is not valid JSON: str is not valid UTF-8"),
    RequestCase("no_in_process_at", "csv_missing_required_column",
                lambda b: with_value(b, ORDERED, DELETE), 422, ("body", *ORDERED),
                "no in_process_at"),
    RequestCase("no_posting_number", "csv_missing_required_column",
                lambda b: with_value(b, ("posting", "posting_number"), DELETE), 422,
                ("body", "posting", "posting_number"), "no posting_number"),
    RequestCase("timestamps_without_zone", "timestamps_without_time_zone", _without_zones, 200,
                same_as=lambda b: b),
    RequestCase("ordered_before_2000", "dates_before_2000",
                lambda b: with_value(b, ORDERED, "1999-12-31T23:59:59Z"), 422, ("body", *ORDERED),
                "before 2000-01-01"),
    RequestCase("as_of_before_2000", "dates_before_2000",
                lambda b: with_value(b, ("as_of",), "1999-12-31T23:59:59Z"), 422,
                ("body", "as_of"), "as_of must lie between 2000 and 2200"),
    RequestCase("ordered_in_2099", "dates_in_the_future",
                lambda b: with_value(b, ORDERED, "2099-01-01T00:00:00Z"), 422, ("body", *ORDERED),
                "after as_of"),
    RequestCase("as_of_in_2099", "dates_in_the_future",
                lambda b: with_value(b, ("as_of",), "2099-01-01T00:00:00Z"), 422,
                ("body", "as_of"), "is in the future"),
    RequestCase("price_1_390_00", "price_1_390_00",
                lambda b: with_value(b, PRICE, "1 390,00"), 200,
                same_as=lambda b: with_value(b, PRICE, "1390.00")),
    RequestCase("price_row_1_390_00", "price_1_390_00",
                lambda b: {**b, "prices": [{"offer_id": "SKU-X", "at": b["as_of"],
                                            "price": "1 390,00"}]}, 200,
                same_as=lambda b: {**b, "prices": [{"offer_id": "SKU-X", "at": b["as_of"],
                                                    "price": 1390}]}),
    RequestCase("price_nan", "price_nan", lambda b: with_value(b, PRICE, "NaN"), 422,
                ("body", *PRICE), "price 'NaN' of product 1 is not a number"),
    RequestCase("price_bare_nan", "price_nan", lambda b: _bare_number(b, "NaN"), 422, ("body",),
                "the body is not valid JSON"),
    RequestCase("price_row_nan", "price_nan",
                lambda b: {**b, "prices": [{"offer_id": "SKU-X", "at": b["as_of"],
                                            "price": "NaN"}]}, 422,
                ("body", "prices", 0, "price"), "price row: price 'NaN' is not a number"),
    RequestCase("price_negative", "price_negative", lambda b: with_value(b, PRICE, "-5"), 422,
                ("body", *PRICE), "price '-5' of product 1 is negative"),
    RequestCase("price_1e309", "price_1e309", lambda b: with_value(b, PRICE, "1e309"), 422,
                ("body", *PRICE), "price '1e309' of product 1 is not finite"),
    RequestCase("price_bare_1e309", "price_1e309", lambda b: _bare_number(b, "1e309"), 422,
                ("body",), "the body is not valid JSON"),
    RequestCase("quantity_0", "quantity_0", lambda b: with_value(b, QUANTITY, 0), 422,
                ("body", *QUANTITY), "quantity '0' of product 1 is not a positive integer"),
    RequestCase("quantity_1e9", "quantity_1e9", lambda b: with_value(b, QUANTITY, 10**9), 422,
                ("body", *QUANTITY), "is more than the 100,000 units a product line may hold"),
    RequestCase("empty_body", "empty_files", lambda b: b"", 422, ("body",), "Field required"),
    RequestCase("empty_object", "empty_files", lambda b: b"{}", 422, ("body", "posting"),
                "Field required"),
    RequestCase("string_of_20_mb", "csv_line_of_20_mb",
                lambda b: with_value(b, ("posting", "notes"), "x" * 20_000_000), 200,
                same_as=lambda b: b),
    RequestCase("unknown_push_type", "unknown_push_types_and_statuses",
                lambda b: _push(b, message_type="TYPE_HOLOGRAM_SENT"), 200, same_as=lambda b: b),
    RequestCase("unknown_push_substate", "unknown_push_types_and_statuses",
                lambda b: _push(b, message_type="TYPE_STATE_CHANGED",
                                new_state="posting_teleported"), 200),
    RequestCase("unknown_status", "unknown_push_types_and_statuses",
                lambda b: with_value(b, ("posting", "status"), "awaiting_teleport"), 200),
    RequestCase("push_type_not_a_string", "unknown_push_types_and_statuses",
                lambda b: _push(b, message_type=42), 422, ("body", "pushes", 0, "message_type"),
                "push: no message_type"),
    RequestCase("products_empty", "postings_without_products",
                lambda b: with_value(b, PRODUCTS, []), 422, ("body", *PRODUCTS), "no products"),
    RequestCase("products_absent", "postings_without_products",
                lambda b: with_value(b, PRODUCTS, DELETE), 422, ("body", *PRODUCTS),
                "no products"),
    RequestCase("products_null", "postings_without_products",
                lambda b: with_value(b, PRODUCTS, None), 422, ("body", *PRODUCTS), "no products"),
    RequestCase("products_of_null", "postings_without_products",
                lambda b: with_value(b, PRODUCTS, [None]), 422, ("body", *PRODUCTS, 0),
                "product 1 is not an object"),
)  # fmt: skip
