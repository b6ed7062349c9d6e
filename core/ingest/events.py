"""Pushes, price-log rows and carrier-scan rows -> rows of the one ``events`` table.

Each source is parsed column-wise. A row whose time or key is unusable becomes a reject with
its line and reason; push types the predictor does not use are counted and skipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.ingest.batches import (
    Parsed,
    build_canonical,
    build_rejects,
    concat_frames,
    empty_table,
)
from core.ingest.values import (
    build_decimals,
    build_integers,
    build_present_mask,
    build_strings,
    build_utc_timestamps,
)
from core.tables import EVENT_COLUMNS, REJECT_COLUMNS

# Ozon's delivery-date push has no time of its own: the archive's receipt stamp stands in, and
# without one, the time of the next timestamped push in the file (the archive is in arrival order,
# so the push was surely known by then and is never used before it could have been).
RECEIVED_AT = "received_at"
NEXT_PUSH_AT = "time of the next timestamped push"
# The keys that date a push of any type, for dating its untimed neighbours.
_PUSH_TIME_KEYS = ("changed_state_date", "in_process_at", "changed_at", RECEIVED_AT, "created_at")


@dataclass(frozen=True)
class PushSpec:
    """How one used push type becomes an event row."""

    kind: str
    time_keys: tuple[str, ...]  # the first present one is the event time
    key: str  # "posting" or "offer"
    state: str | None = None  # fixed state for this type, when the push carries none
    state_key: str | None = None  # push key holding the state
    state_required: bool = False


PUSH_SPECS: dict[str, PushSpec] = {
    "TYPE_NEW_POSTING": PushSpec(
        "state_change", ("in_process_at", RECEIVED_AT), "posting", state="posting_created"
    ),
    "TYPE_STATE_CHANGED": PushSpec(
        "state_change",
        ("changed_state_date", RECEIVED_AT),
        "posting",
        state_key="new_state",
        state_required=True,
    ),
    "TYPE_POSTING_CANCELLED": PushSpec(
        "cancellation",
        ("changed_state_date", RECEIVED_AT),
        "posting",
        state="posting_canceled",
        state_key="new_state",
    ),
    "TYPE_DELIVERY_DATE_CHANGED": PushSpec(
        "delivery_date_change", (RECEIVED_AT, "changed_at", NEXT_PUSH_AT), "posting"
    ),
    "TYPE_CREATE_OR_UPDATE_ITEM": PushSpec("card_edit", ("changed_at", RECEIVED_AT), "offer"),
}

# Columns of the price log and the scan log (the CSV header, or the keys of row objects).
PRICE_COLUMNS = ("offer_id", "at", "price", "old_price", "currency_code")
SCAN_COLUMNS = ("posting_number", "at", "status", "location")

# The substates after which a posting counts as delivered.
DELIVERED_STATES = frozenset({"posting_delivered", "posting_received"})


# A per-row check: the rows that fail it and their reason (text, or text made from the row).
Check = tuple[np.ndarray, str | Callable[[int], str]]


def apply_checks(checks: Sequence[Check], n: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Apply checks in order; a failing row gets the reason of the first check it fails.

    Returns the mask of failing rows and, in check order, their positions and reasons.
    """
    failing = np.zeros(n, dtype=bool)
    positions: list[int] = []
    reasons: list[str] = []
    for mask, reason in checks:
        for k in np.flatnonzero(mask & ~failing):
            positions.append(int(k))
            reasons.append(reason(int(k)) if callable(reason) else reason)
        failing |= mask
    return failing, positions, reasons


@dataclass
class PushBatch(Parsed):
    """Events from pushes, plus what was skipped on purpose (not rejects)."""

    skipped_types: Counter[str] = field(default_factory=Counter)
    failed_item_updates: int = 0  # TYPE_CREATE_OR_UPDATE_ITEM with is_error: no edit happened


def empty_events() -> pd.DataFrame:
    return empty_table(EVENT_COLUMNS)


def _first_present(
    records: list[dict[str, Any]], keys: tuple[str, ...]
) -> tuple[list[Any], list[str]]:
    """Per record, the value of the first key that holds something, and which key that was."""
    values: list[Any] = []
    used: list[str] = []
    for record in records:
        for key in keys:
            value = record.get(key)
            if value is not None and value != "":
                values.append(value)
                used.append(key)
                break
        else:
            values.append(None)
            used.append(keys[0])
    return values, used


def _build_push_type_rows(
    message_type: str, records: list[dict[str, Any]], lines: list[int], file: str
) -> tuple[pd.DataFrame, list[int], list[str]]:
    """Event rows for the pushes of one used type; the lines and reasons of its rejects."""
    spec = PUSH_SPECS[message_type]
    raw_at, time_keys = _first_present(records, spec.time_keys)
    at, bad_at = build_utc_timestamps(raw_at)
    given_at = build_present_mask(pd.Series(raw_at, dtype=object))
    columns: dict[str, Any] = {"at": at, "kind": spec.kind}
    checks: list[Check] = []

    if spec.key == "posting":
        numbers = build_strings([r.get("posting_number") for r in records])
        columns["posting_number"] = numbers
        checks.append((numbers.isna().to_numpy(), "no posting_number"))
    else:
        offers = build_strings([r.get("offer_id") for r in records])
        skus = build_integers([r.get("product_id") for r in records])[0]
        columns["offer_id"] = offers
        columns["sku"] = skus.mask(skus.eq(0))
        no_key = (offers.isna() & columns["sku"].isna()).to_numpy()
        checks.append((no_key, "neither offer_id nor product_id"))

    checks.append((~given_at, lambda k: _missing_time(spec, time_keys[k])))
    checks.append((bad_at, lambda k: f"{time_keys[k]} '{raw_at[k]}' is not a timestamp"))

    if spec.state_key is not None:
        states = build_strings([r.get(spec.state_key) for r in records])
        if spec.state is not None:
            states = states.fillna(spec.state)
        columns["state"] = states
        if spec.state_required:
            checks.append((states.isna().to_numpy(), f"no {spec.state_key}"))
    elif spec.state is not None:
        columns["state"] = spec.state

    if spec.kind == "cancellation":
        reasons = [r.get("reason") if type(r.get("reason")) is dict else {} for r in records]
        reason_id = build_integers([r.get("id") for r in reasons])[0]
        columns["reason_id"] = reason_id.mask(reason_id.eq(0))
        columns["reason"] = build_strings([r.get("message") for r in reasons])
    if spec.kind == "delivery_date_change":
        for column, key in (
            ("delivery_begin_at", "new_delivery_date_begin"),
            ("delivery_end_at", "new_delivery_date_end"),
            ("old_delivery_begin_at", "old_delivery_date_begin"),
            ("old_delivery_end_at", "old_delivery_date_end"),
        ):
            columns[column] = build_utc_timestamps([r.get(key) for r in records])[0]

    columns["source_file"] = file
    columns["source_line"] = lines
    rows = pd.DataFrame(columns)
    failing, positions, reasons = apply_checks(checks, len(records))
    reject_reasons = [f"{message_type} push: {reason}" for reason in reasons]
    return rows[~failing], [lines[k] for k in positions], reject_reasons


def _missing_time(spec: PushSpec, key: str) -> str:
    if NEXT_PUSH_AT in spec.time_keys:
        return f"no {RECEIVED_AT}, and no later timestamped push to date it by"
    return f"no {key}"


def next_push_times(records: Sequence[Any]) -> list[Any]:
    """For each push, the time of the nearest later push that carries a time of its own."""
    result: list[Any] = [None] * len(records)
    upcoming = None
    for k in range(len(records) - 1, -1, -1):
        result[k] = upcoming
        record = records[k]
        if type(record) is dict:
            for key in _PUSH_TIME_KEYS:
                value = record.get(key)
                if isinstance(value, str) and value:
                    upcoming = value
                    break
    return result


def with_receipt_times(records: Sequence[Any]) -> list[Any]:
    """The pushes, each one that ingestion would date by the next timestamped push given that
    time as its ``received_at``.

    A REST request carries only some of the archive's pushes, so it cannot date an untimed push
    by its neighbours in the archive; with the time made explicit, the request and the archive
    give the push the same time.
    """
    next_at = next_push_times(records)
    dated = list(records)
    for position, record in enumerate(records):
        if type(record) is not dict or next_at[position] is None:
            continue
        spec = PUSH_SPECS.get(record.get("message_type"))  # type: ignore[arg-type]
        if spec is None or NEXT_PUSH_AT not in spec.time_keys:
            continue
        own_keys = spec.time_keys[: spec.time_keys.index(NEXT_PUSH_AT)]
        if all(record.get(key) in (None, "") for key in own_keys):
            dated[position] = {**record, RECEIVED_AT: next_at[position]}
    return dated


def build_push_events(records: Sequence[Any], lines: Sequence[int], file: str) -> PushBatch:
    """Events from decoded push notifications (one JSON object each).

    A value that is not an object or has no ``message_type`` is a reject; used types with no
    usable key or time are rejects; other types are counted in ``skipped_types``.
    """
    lines = list(lines)
    next_push_at = next_push_times(records)
    by_type: dict[str, tuple[list[dict[str, Any]], list[int]]] = {}
    skipped: Counter[str] = Counter()
    failed_updates = 0
    reject_lines: list[int] = []
    reject_reasons: list[str] = []
    for position, (record, line) in enumerate(zip(records, lines, strict=True)):
        if type(record) is not dict:
            reject_lines.append(line)
            reject_reasons.append("push: not a JSON object")
            continue
        message_type = record.get("message_type")
        if type(message_type) is not str or not message_type:
            reject_lines.append(line)
            reject_reasons.append("push: no message_type")
        elif message_type not in PUSH_SPECS:
            skipped[message_type] += 1
        elif message_type == "TYPE_CREATE_OR_UPDATE_ITEM" and record.get("is_error") is True:
            failed_updates += 1
        else:
            group = by_type.setdefault(message_type, ([], []))
            if NEXT_PUSH_AT in PUSH_SPECS[message_type].time_keys:
                record = {**record, NEXT_PUSH_AT: next_push_at[position]}
            group[0].append(record)
            group[1].append(line)

    frames = []
    for message_type, (group, group_lines) in by_type.items():
        rows, bad_lines, bad_reasons = _build_push_type_rows(message_type, group, group_lines, file)
        frames.append(rows)
        reject_lines.extend(bad_lines)
        reject_reasons.extend(bad_reasons)
    events = build_canonical(concat_frames(frames, empty_events()), EVENT_COLUMNS)
    rejects = build_rejects(file, reject_lines, reject_reasons).sort_values(
        "line", kind="stable", ignore_index=True
    )
    return PushBatch(
        source=file,
        frame=events,
        rejects=rejects,
        records_read=len(lines),
        skipped_types=skipped,
        failed_item_updates=failed_updates,
    )


def _row_rejects(
    checks: Sequence[Check], lines: np.ndarray, file: str
) -> tuple[np.ndarray, pd.DataFrame]:
    """The failing rows of a side file and their rejects, in line order."""
    failing, positions, reasons = apply_checks(checks, len(lines))
    if not positions:
        return failing, empty_table(REJECT_COLUMNS)
    rejects = build_rejects(file, lines[positions], reasons)
    return failing, rejects.sort_values("line", kind="stable", ignore_index=True)


def _problems(row_problems: Sequence[str | None] | np.ndarray | None, n: int) -> np.ndarray:
    """Per-row structural problems found by the file reader (None = row is fine)."""
    if row_problems is None:
        return np.full(n, None, dtype=object)
    return np.asarray(row_problems, dtype=object)


def _column(columns: Mapping[str, Sequence[Any]], name: str, n: int) -> pd.Series:
    if name in columns:
        values = columns[name]
        if isinstance(values, pd.Series):
            # The same objects as list(values) (NA stays NA), without a Python-level loop
            # over an Arrow-backed column: ten times faster on a large CSV.
            return pd.Series(values.to_numpy(dtype=object), dtype=object)
        return pd.Series(list(values), dtype=object)
    return pd.Series([None] * n, dtype=object)


def build_price_events(
    columns: Mapping[str, Sequence[Any]],
    lines: Sequence[int],
    file: str,
    *,
    row_problems: Sequence[str | None] | np.ndarray | None = None,
) -> Parsed:
    """``price`` events from price-log rows (``offer_id, at, price[, old_price, currency_code]``).

    Values may be strings or numbers; decimals may use a comma. A row needs an offer_id, a
    readable time and a finite non-negative price; an old_price, when given, must be a number.
    """
    line_array = np.asarray(list(lines), dtype=np.int64)
    n = len(line_array)
    raw_at = _column(columns, "at", n)
    raw_price = _column(columns, "price", n)
    raw_old = _column(columns, "old_price", n)
    offers = build_strings(_column(columns, "offer_id", n))
    at, bad_at = build_utc_timestamps(raw_at)
    price, bad_price = build_decimals(raw_price)
    old_price, bad_old = build_decimals(raw_old)
    values = price.to_numpy()
    with np.errstate(invalid="ignore"):
        unusable = price.notna().to_numpy() & ~(np.isfinite(values) & (values >= 0))
    problems = _problems(row_problems, n)
    failing, rejects = _row_rejects(
        [
            (pd.notna(problems), lambda k: f"price row: {problems[k]}"),
            (offers.isna().to_numpy(), "price row: no offer_id"),
            (at.isna().to_numpy() & ~bad_at, "price row: no at"),
            (bad_at, lambda k: f"price row: at '{raw_at[k]}' is not a timestamp"),
            (price.isna().to_numpy() & ~bad_price, "price row: no price"),
            (bad_price, lambda k: f"price row: price '{raw_price[k]}' is not a number"),
            (unusable, lambda k: f"price row: price '{raw_price[k]}' is negative or not finite"),
            (bad_old, lambda k: f"price row: old_price '{raw_old[k]}' is not a number"),
        ],
        line_array,
        file,
    )
    events = pd.DataFrame(
        {
            "at": at,
            "kind": "price",
            "offer_id": offers,
            "price": price,
            "old_price": old_price,
            "currency_code": build_strings(_column(columns, "currency_code", n)),
            "source_file": file,
            "source_line": line_array,
        }
    )
    return Parsed(file, build_canonical(events[~failing], EVENT_COLUMNS), rejects, n)


def build_scan_events(
    columns: Mapping[str, Sequence[Any]],
    lines: Sequence[int],
    file: str,
    *,
    row_problems: Sequence[str | None] | np.ndarray | None = None,
) -> Parsed:
    """``carrier_scan`` events from tracking rows (``posting_number, at, status[, location]``).

    A row needs a posting_number and a readable time; a scan without a status still says the
    parcel was seen, so it is kept.
    """
    line_array = np.asarray(list(lines), dtype=np.int64)
    n = len(line_array)
    raw_at = _column(columns, "at", n)
    numbers = build_strings(_column(columns, "posting_number", n))
    at, bad_at = build_utc_timestamps(raw_at)
    problems = _problems(row_problems, n)
    failing, rejects = _row_rejects(
        [
            (pd.notna(problems), lambda k: f"scan row: {problems[k]}"),
            (numbers.isna().to_numpy(), "scan row: no posting_number"),
            (at.isna().to_numpy() & ~bad_at, "scan row: no at"),
            (bad_at, lambda k: f"scan row: at '{raw_at[k]}' is not a timestamp"),
        ],
        line_array,
        file,
    )
    events = pd.DataFrame(
        {
            "at": at,
            "kind": "carrier_scan",
            "posting_number": numbers,
            "state": build_strings(_column(columns, "status", n)),
            "location": build_strings(_column(columns, "location", n)),
            "source_file": file,
            "source_line": line_array,
        }
    )
    return Parsed(file, build_canonical(events[~failing], EVENT_COLUMNS), rejects, n)


def build_row_columns(
    rows: Sequence[Any], names: Sequence[str], file: str, what: str
) -> tuple[dict[str, list[Any]], list[int], pd.DataFrame]:
    """Column lists from row objects (dicts keyed like the CSV header).

    Returns the columns, the 1-based positions of the usable rows and rejects for rows that
    are not objects.
    """
    good = [(i + 1, row) for i, row in enumerate(rows) if type(row) is dict]
    bad = [i + 1 for i, row in enumerate(rows) if type(row) is not dict]
    columns = {name: [row.get(name) for _, row in good] for name in names}
    rejects = build_rejects(file, bad, [f"{what}: not an object"] * len(bad))
    return columns, [line for line, _ in good], rejects
