"""One posting scored without pandas: the canonical request parsed and its features computed.

``build_features`` is vectorised over whole histories; for the one posting of a REST request its
fixed cost (a few dozen small DataFrames, a dozen ``merge_asof`` calls) is ~150 ms. This module
computes the *same* feature row for one posting in plain Python, in about a tenth of a
millisecond, under two guarantees:

- **Canonical input only.** :func:`parse_request` accepts a request only when every value the
  features read has the canonical form of the Seller API and the contract (ISO-8601 timestamps,
  JSON numbers or plain decimal strings, integer ids, ...) and no record would be rejected.
  Anything else raises :class:`NotCanonical` and the caller takes the reference path
  (``tables_from_objects`` + ``build_features``), which also words the 422 messages.
- **Parity.** Every step mirrors the reference step it replaces (named in its docstring) down
  to the order of floating-point operations; ``tests/test_serving_parity.py`` proves the rows
  equal to 1e-9 on simulated and generated requests, and :class:`FastFeatureBuilder` is checked
  against the reference on probe requests each time a model is loaded.

History aggregates are looked up by ``HistoryAggregates.lookup_columns``, the code
``build_features`` runs, on one-row columns.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

import core.ingest.events as ingest_events
from core.aggregates import NAT_NS, HistoryAggregates, earliest_ns
from core.features import (
    CATEGORICAL_COLUMNS,
    DELIVERY_STAGES,
    FEATURE_COLUMNS,
    FEATURE_VERSION,
    HANDED_OVER_STAGE,
    RUB_PER_UNIT,
    TOLERATED_SILENCE_HOURS,
)
from core.ingest.events import DELIVERED_STATES, PUSH_SPECS
from core.ingest.postings import MAX_QUANTITY
from core.tables import PUSH_KINDS, SCAN_KINDS, TERMINAL_STATUSES

# The feature version this module computes; a model of another version takes the reference path.
FAST_FEATURE_VERSION = "2"

NS_PER_SECOND = 1_000_000_000
_NS_PER_HOUR = 3_600_000_000_000.0
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EXACT_FLOAT_INT = 2**53
_EMPTY: dict[str, Any] = {}

# The canonical timestamps: a date, or a date and time to the second with an optional fraction
# (up to nanoseconds) and an optional "Z" or ±HH:MM offset. Naive means UTC, as in ingestion.
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?)?"
)
# Plain decimals as the Seller API writes prices ("1390.000000"); an optional minus sign.
_DECIMAL = re.compile(r"(-?)(\d{1,15})(?:\.(\d{1,12}))?")
_CANONICAL_YEARS = range(1900, 2201)
# Time keys the ingestion fills in itself (a push dated by its neighbours): the reference path's.
_DERIVED_TIME_KEYS = frozenset(
    key for key in (getattr(ingest_events, "NEXT_PUSH_AT", None),) if key is not None
)


class NotCanonical(Exception):
    """The request is not in the canonical shape this path handles; use the reference path."""


# --- values ------------------------------------------------------------------------------------


def parse_timestamp(value: Any) -> int | None:
    """A canonical ISO-8601 timestamp as UTC nanoseconds; None when absent (null or blank).

    Mirrors ``build_utc_timestamps`` on the values it accepts.
    """
    if value is None:
        return None
    if type(value) is not str:
        if isinstance(value, float) and math.isnan(value):
            return None
        raise NotCanonical
    return _parse_timestamp_text(value)


@lru_cache(maxsize=65_536)
def _parse_timestamp_text(value: str) -> int | None:
    # Cached: a seller sends the same price-log and push times with many requests.
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        if not value.strip():
            return None
        raise NotCanonical
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    year_number = int(year)
    if year_number not in _CANONICAL_YEARS:
        raise NotCanonical
    try:
        days = date(year_number, int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise NotCanonical from None
    seconds = days * 86_400
    nanos = 0
    if hour is not None:
        h, m, s = int(hour), int(minute), int(second)
        if h > 23 or m > 59 or s > 59:
            raise NotCanonical
        seconds += h * 3600 + m * 60 + s
        if fraction is not None:
            nanos = int(fraction.ljust(9, "0"))
        if offset is not None and offset != "Z":
            offset_hours, offset_minutes = int(offset[1:3]), int(offset[4:6])
            if offset_hours > 14 or offset_minutes > 59:
                raise NotCanonical
            shift = offset_hours * 3600 + offset_minutes * 60
            seconds -= shift if offset[0] == "+" else -shift
    return seconds * NS_PER_SECOND + nanos


def parse_decimal(value: Any) -> float | None:
    """A JSON number or a plain decimal string as a float; None when absent.

    Mirrors ``build_decimals``: booleans are not numbers, blank strings are absent.
    """
    if value is None:
        return None
    kind = type(value)
    if kind is float:
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise NotCanonical
        return value
    if kind is int:
        if -_EXACT_FLOAT_INT < value < _EXACT_FLOAT_INT:
            return float(value)
        raise NotCanonical
    if kind is str:
        if _DECIMAL.fullmatch(value) is not None:
            return float(value)
        if not value.strip():
            return None
    raise NotCanonical


def parse_integer(value: Any) -> int | None:
    """An integer id or count; None when absent. Mirrors ``build_integers`` on ints."""
    if value is None:
        return None
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    if type(value) is str and not value.strip():
        return None
    raise NotCanonical


def parse_text(value: Any) -> str | None:
    """Free text or a code, stripped; None when absent or empty. Mirrors ``build_strings``."""
    if value is None:
        return None
    if type(value) is str:
        text = value
    elif isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value)):
        text = str(value)
    else:
        return None
    text = text.strip()
    return text or None


def parse_bool(value: Any) -> bool | None:
    """A JSON boolean; anything else is unknown. Mirrors ``build_booleans``."""
    return value if type(value) is bool else None


def _obj(value: Any) -> dict[str, Any]:
    return value if type(value) is dict else _EMPTY


def _first_given(primary: Any, fallback: Any) -> Any:
    return primary if primary is not None and primary != "" else fallback


# --- the parsed request ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One product line of the posting."""

    line_no: int
    sku: int | None
    offer_id: str | None
    quantity: int
    unit_price: float
    currency: str | None

    @property
    def value(self) -> float:
        return self.unit_price * float(self.quantity)


@dataclass(frozen=True, slots=True)
class PriceRow:
    offer_id: str
    at: int
    price: float
    old_price: float  # NaN when not logged
    currency: str | None


@dataclass(frozen=True, slots=True)
class DateChange:
    posting_number: str
    at: int
    begin: int | None
    end: int | None
    old_begin: int | None
    old_end: int | None


@dataclass
class ParsedRequest:
    """The fields of one posting and its events that the features read, in canonical form."""

    posting_number: str
    status: str | None
    ordered_at: int
    shipment_deadline_at: int | None
    handed_over_at: int | None
    promised_begin_at: int | None
    promised_end_at: int | None
    carrier_id: int | None
    region: str | None
    payment_type: str | None
    delivery_type: str | None
    is_premium: bool | None
    is_legal: bool | None
    customer_id: int | None
    lines: list[Line]
    prices: list[PriceRow] = field(default_factory=list)
    state_changes: list[tuple[str, int, str | None]] = field(default_factory=list)
    cancellations: list[tuple[str, int]] = field(default_factory=list)
    date_changes: list[DateChange] = field(default_factory=list)
    card_edits: list[tuple[str | None, int]] = field(default_factory=list)
    scans: list[tuple[str, int]] = field(default_factory=list)

    @property
    def first_push_at(self) -> int | None:
        """The earliest push of any kind the features count as "pushes are archived"."""
        times = [at for _, at, _ in self.state_changes]
        times += [at for _, at in self.cancellations]
        times += [change.at for change in self.date_changes]
        times += [at for _, at in self.card_edits]
        return min(times) if times else None

    @property
    def first_scan_at(self) -> int | None:
        return min((at for _, at in self.scans), default=None)


def parse_posting(record: Any) -> ParsedRequest:
    """The posting object, mirroring ``build_api_posting_batch`` for one usable record."""
    if type(record) is not dict:
        raise NotCanonical
    number = record.get("posting_number")
    if not (type(number) is int or (type(number) is str and number.strip())):
        raise NotCanonical
    in_process = record.get("in_process_at")
    ordered_at = parse_timestamp(_first_given(in_process, record.get("created_at")))
    if ordered_at is None:
        raise NotCanonical
    products = record.get("products")
    if type(products) is not list or not products:
        raise NotCanonical
    lines = []
    for position, product in enumerate(products):
        if type(product) is not dict:
            raise NotCanonical
        price = parse_decimal(product.get("price"))
        quantity = parse_integer(product.get("quantity"))
        if price is None or price < 0 or quantity is None or not 0 < quantity <= MAX_QUANTITY:
            raise NotCanonical
        lines.append(
            Line(
                line_no=position,
                sku=parse_integer(product.get("sku")),
                offer_id=parse_text(product.get("offer_id")),
                quantity=quantity,
                unit_price=price,
                currency=parse_text(product.get("currency_code")),
            )
        )
    method = _obj(record.get("delivery_method"))
    analytics = _obj(record.get("analytics_data"))
    posting_number = parse_text(number)
    if posting_number is None:
        raise NotCanonical
    return ParsedRequest(
        posting_number=posting_number,
        status=parse_text(record.get("status")),
        ordered_at=ordered_at,
        shipment_deadline_at=parse_timestamp(record.get("shipment_date")),
        handed_over_at=parse_timestamp(record.get("delivering_date")),
        promised_begin_at=parse_timestamp(analytics.get("delivery_date_begin")),
        promised_end_at=parse_timestamp(analytics.get("delivery_date_end")),
        carrier_id=parse_integer(
            _first_given(method.get("tpl_provider_id"), analytics.get("tpl_provider_id"))
        ),
        region=parse_text(analytics.get("region")),
        payment_type=parse_text(analytics.get("payment_type_group_name")),
        delivery_type=parse_text(analytics.get("delivery_type")),
        is_premium=parse_bool(analytics.get("is_premium")),
        is_legal=parse_bool(analytics.get("is_legal")),
        customer_id=parse_integer(_obj(record.get("customer")).get("customer_id")),
        lines=lines,
    )


def _push_time(push: dict[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        if key in _DERIVED_TIME_KEYS:
            raise NotCanonical  # dated from other pushes: the reference path does that
        value = push.get(key)
        if value is not None and value != "":
            at = parse_timestamp(value)
            if at is None:
                raise NotCanonical
            return at
    raise NotCanonical


def _add_push(parsed: ParsedRequest, push: Any) -> None:
    """One webhook push, mirroring ``build_push_events`` (unused types are skipped)."""
    if type(push) is not dict:
        raise NotCanonical
    message_type = push.get("message_type")
    if type(message_type) is not str or not message_type:
        raise NotCanonical
    spec = PUSH_SPECS.get(message_type)
    if spec is None:
        return
    if message_type == "TYPE_CREATE_OR_UPDATE_ITEM" and push.get("is_error") is True:
        return
    at = _push_time(push, spec.time_keys)
    if spec.kind == "card_edit":
        offer_id = parse_text(push.get("offer_id"))
        sku = parse_integer(push.get("product_id"))
        if offer_id is None and (sku is None or sku == 0):
            raise NotCanonical
        parsed.card_edits.append((offer_id, at))
        return
    if spec.key != "posting":
        raise NotCanonical  # an offer push kind this path does not know
    number = parse_text(push.get("posting_number"))
    if number is None:
        raise NotCanonical
    state = spec.state
    if spec.state_key is not None:
        state = parse_text(push.get(spec.state_key)) or spec.state
        if spec.state_required and state is None:
            raise NotCanonical
    if spec.kind == "state_change":
        parsed.state_changes.append((number, at, state))
    elif spec.kind == "cancellation":
        parsed.cancellations.append((number, at))
    elif spec.kind == "delivery_date_change":
        parsed.date_changes.append(
            DateChange(
                number,
                at,
                parse_timestamp(push.get("new_delivery_date_begin")),
                parse_timestamp(push.get("new_delivery_date_end")),
                parse_timestamp(push.get("old_delivery_date_begin")),
                parse_timestamp(push.get("old_delivery_date_end")),
            )
        )
    else:
        raise NotCanonical  # a posting push kind this path does not know


def _add_price_row(parsed: ParsedRequest, row: Any) -> None:
    """One price-log row, mirroring ``build_price_events``."""
    if type(row) is not dict:
        raise NotCanonical
    offer_id = parse_text(row.get("offer_id"))
    at = parse_timestamp(row.get("at"))
    price = parse_decimal(row.get("price"))
    if offer_id is None or at is None or price is None or price < 0:
        raise NotCanonical
    old_price = parse_decimal(row.get("old_price"))
    parsed.prices.append(
        PriceRow(
            offer_id,
            at,
            price,
            math.nan if old_price is None else old_price,
            parse_text(row.get("currency_code")),
        )
    )


def _add_scan_row(parsed: ParsedRequest, row: Any) -> None:
    """One carrier-scan row, mirroring ``build_scan_events``."""
    if type(row) is not dict:
        raise NotCanonical
    number = parse_text(row.get("posting_number"))
    at = parse_timestamp(row.get("at"))
    if number is None or at is None:
        raise NotCanonical
    parsed.scans.append((number, at))


def parse_request(
    posting: Any,
    pushes: Iterable[Any] = (),
    prices: Iterable[Any] = (),
    tracking: Iterable[Any] = (),
) -> ParsedRequest:
    """Parse a canonical request; :class:`NotCanonical` when the reference path must do it."""
    parsed = parse_posting(posting)
    for push in pushes:
        _add_push(parsed, push)
    for row in prices:
        _add_price_row(parsed, row)
    for row in tracking:
        _add_scan_row(parsed, row)
    return parsed


# --- closing and openness ----------------------------------------------------------------------


@dataclass(frozen=True)
class Closing:
    """How the posting stands at the end of its records: status, and when it closed if it did."""

    status: str | None
    closed_at: int | None
    closing_time_unknown: bool

    def is_open(self, ordered_at: int, as_of: int) -> bool:
        """``build_open_mask`` for one posting."""
        not_closed = self.closed_at is None or self.closed_at > as_of
        return ordered_at <= as_of and not_closed and not self.closing_time_unknown


def build_closing(parsed: ParsedRequest) -> Closing:
    """``build_closed_postings`` then ``build_resolutions`` for the request's posting."""
    number = parsed.posting_number
    cancel_at = min((at for n, at in parsed.cancellations if n == number), default=None)
    deliver_at = min(
        (at for n, at, state in parsed.state_changes if n == number and state in DELIVERED_STATES),
        default=None,
    )
    status = parsed.status
    if status not in TERMINAL_STATUSES:
        if cancel_at is not None and (deliver_at is None or cancel_at <= deliver_at):
            status = "cancelled"
        elif deliver_at is not None:
            status = "delivered"
    closed_at = None
    if status == "cancelled":
        closed_at = cancel_at
    elif status == "delivered":
        closed_at = deliver_at
    unknown = status in TERMINAL_STATUSES and closed_at is None
    return Closing(status=status, closed_at=closed_at, closing_time_unknown=unknown)


# --- numeric helpers mirroring numpy / pandas --------------------------------------------------


def _hours(later: int | None, earlier: int | None) -> float:
    """``features._hours``: int64 difference, then float division by the hour in ns."""
    if later is None or earlier is None:
        return math.nan
    return float(later - earlier) / _NS_PER_HOUR


def _divide(numerator: float, denominator: float) -> float:
    """IEEE division as numpy does it (x/0 is inf or NaN, never an exception)."""
    if denominator != 0:
        return numerator / denominator
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(numerator) / np.float64(denominator))


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """``aggregates.weighted_mean_by_row`` for one row, summing in the same order."""
    weighted_sum = weight_total = plain_sum = count = 0.0
    for value, weight in zip(values, weights, strict=True):
        weight = 0.0 if math.isnan(weight) else weight
        known = not math.isnan(value)
        safe = value if known else 0.0
        usable = weight if known and weight > 0 else 0.0
        weighted_sum += usable * safe
        weight_total += usable
        plain_sum += safe
        count += 1.0 if known else 0.0
    if weight_total > 0:
        return weighted_sum / weight_total
    if count > 0:
        return plain_sum / count
    return math.nan


def _segment_sum(values: Sequence[float]) -> float:
    """pandas' groupby sum of one group without NaN: ``np.add.reduceat`` over the segment."""
    return float(np.add.reduceat(np.asarray(values, dtype="float64"), [0])[0])


# --- the history aggregates --------------------------------------------------------------------


HISTORY_COLUMNS = (
    "carrier_buyer_cancel_rate",
    "sku_buyer_cancel_rate",
    "region_buyer_cancel_rate",
    "buyer_earlier_postings",
    "buyer_earlier_buyer_cancels",
)


def lookup_history(
    aggregates: HistoryAggregates, parsed: Sequence[ParsedRequest], as_of: Sequence[int]
) -> dict[str, list[float]]:
    """The postings' history aggregates, each at its ``as_of``: one call of
    ``HistoryAggregates.lookup_columns``, the code ``build_features`` runs, for all of them."""
    line_row = [k for k, posting in enumerate(parsed) for _ in posting.lines]
    lines = [line for posting in parsed for line in posting.lines]
    values = aggregates.lookup_columns(
        carrier_id=[posting.carrier_id for posting in parsed],
        region=[posting.region for posting in parsed],
        customer_id=[posting.customer_id for posting in parsed],
        ordered_ns=np.array([posting.ordered_at for posting in parsed], dtype="int64"),
        as_of_ns=np.array(as_of, dtype="int64"),
        line_row=np.array(line_row, dtype="int64"),
        line_sku=[line.sku for line in lines],
        line_weight=np.array([line.value for line in lines], dtype="float64"),
    )
    return {name: values[name].tolist() for name in HISTORY_COLUMNS}


# --- the feature families ----------------------------------------------------------------------


def _last_at_or_before(times: Sequence[int], moment: int) -> int:
    """Index of the last of the sorted ``times`` at or before ``moment``; -1 when none."""
    return bisect_right(times, moment) - 1


def _price_key(row: PriceRow, currency_codes: Mapping[str | None, int]) -> tuple:
    # numpy's lexsort order: time, price, old price (NaN last), currency code (first seen first).
    old = row.old_price
    old_key = (1, 0.0) if math.isnan(old) else (0, old)
    return (row.at, row.price, old_key, currency_codes[row.currency])


def build_price_since_purchase(parsed: ParsedRequest, as_of: int) -> dict[str, float]:
    """``features.build_price_since_purchase`` for one posting."""
    names = (
        "price_change_pct",
        "lowest_price_change_pct",
        "price_changes_since_purchase",
        "promotion_since_purchase",
    )
    if not parsed.prices or not parsed.lines:
        return dict.fromkeys(names, math.nan)
    # Currency codes in the currencies' sort order, as ``features._encode_sorted`` numbers them.
    in_time_order = sorted(parsed.prices, key=lambda row: row.at)
    currencies = {row.currency for row in parsed.prices} | {line.currency for line in parsed.lines}
    codes: dict[str | None, int] = {None: -1}
    codes.update((code, i) for i, code in enumerate(sorted(currencies - {None})))
    by_offer: dict[str, list[PriceRow]] = {}
    for row in in_time_order:
        by_offer.setdefault(row.offer_id, []).append(row)
    for rows in by_offer.values():
        rows.sort(key=lambda row: _price_key(row, codes))

    per_line: dict[str, list[float]] = {name: [] for name in names}
    for line in parsed.lines:
        rows = by_offer.get(line.offer_id, []) if line.offer_id is not None else []
        values = _line_price_values(rows, line, parsed.ordered_at, as_of, codes)
        for name, value in zip(names, values, strict=True):
            per_line[name].append(value)
    weights = [line.value for line in parsed.lines]
    return {name: _weighted_mean(per_line[name], weights) for name in names}


def _line_price_values(
    rows: list[PriceRow],
    line: Line,
    ordered_at: int,
    as_of: int,
    codes: Mapping[str | None, int],
) -> tuple[float, float, float, float]:
    """The four price values of one product line (NaN where the reference gives NaN)."""
    times = [row.at for row in rows]
    at_purchase = _last_at_or_before(times, ordered_at)
    at_as_of = _last_at_or_before(times, as_of)
    if at_as_of < 0:
        return math.nan, math.nan, math.nan, math.nan
    paid = line.unit_price
    payable = paid > 0
    line_code = codes[line.currency]
    latest_code = codes[rows[at_as_of].currency]
    comparable = line_code < 0 or latest_code < 0 or line_code == latest_code
    price_change = math.nan
    if payable and comparable:
        price_change = (rows[at_as_of].price / paid - 1.0) * 100.0

    end = at_as_of + 1
    after_purchase = at_purchase + 1 if at_purchase >= 0 else 0
    start_changes = min(after_purchase, end)
    changes = sum(
        1 for k in range(max(start_changes, 1), end) if rows[k].price != rows[k - 1].price
    )
    promotion = any(
        not math.isnan(rows[k].old_price) and rows[k].old_price > rows[k].price
        for k in range(start_changes, end)
    )

    since_purchase = at_purchase if at_purchase >= 0 else 0
    lowest = (
        min(rows[k].price for k in range(since_purchase, at_as_of + 1))
        if since_purchase <= at_as_of
        else math.nan
    )
    start = min(since_purchase, end)
    known = sum(1 for k in range(start, end) if codes[rows[k].currency] >= 0)
    same = sum(1 for k in range(start, end) if codes[rows[k].currency] == line_code)
    mixed = line_code >= 0 and known > same
    lowest_change = (lowest / paid - 1.0) * 100.0 if payable and not mixed else math.nan
    return price_change, lowest_change, float(max(changes, 0)), 1.0 if promotion else 0.0


def _promise_at(parsed: ParsedRequest, moment: int) -> tuple[int | None, float]:
    """``features._promise_at`` for one posting: the promised end in force, changes known."""
    changes = sorted(
        (c for c in parsed.date_changes if c.posting_number == parsed.posting_number),
        key=lambda c: (
            c.at,
            *(_INT64_MIN if t is None else t for t in (c.begin, c.end, c.old_begin, c.old_end)),
        ),
    )
    if not changes:
        return parsed.promised_end_at, 0.0
    latest = _last_at_or_before([c.at for c in changes], moment)
    if latest >= 0:
        return changes[latest].end, float(latest + 1)
    return changes[0].old_end, 0.0


def build_carrier_and_promise(
    parsed: ParsedRequest, as_of: int, pushes_collected: bool
) -> dict[str, Any]:
    """``features.build_carrier_and_promise`` for one posting."""
    end_now, changes = _promise_at(parsed, as_of)
    end_at_order, _ = _promise_at(parsed, parsed.ordered_at)
    return {
        "carrier": None if parsed.carrier_id is None else str(parsed.carrier_id),
        "promised_lead_time_hours": _hours(end_at_order, parsed.ordered_at),
        "hours_to_shipment_deadline": _hours(parsed.shipment_deadline_at, as_of),
        "hours_to_promised_delivery_end": _hours(end_now, as_of),
        "delivery_date_changes": changes if pushes_collected else math.nan,
        "delivery_date_shift_hours": _hours(end_now, end_at_order)
        if pushes_collected
        else math.nan,
    }


def build_timeline(
    parsed: ParsedRequest, as_of: int, pushes_collected: bool, scans_collected: bool
) -> dict[str, float]:
    """``features.build_timeline`` for one posting."""
    number = parsed.posting_number
    scan_times = sorted(at for n, at in parsed.scans if n == number)
    last_scan = _last_at_or_before(scan_times, as_of)
    scan_count = float(last_scan + 1) if last_scan >= 0 else 0.0
    last_scan_at = scan_times[last_scan] if last_scan >= 0 else None
    state_times = sorted(at for n, at, _ in parsed.state_changes if n == number)
    last_state = _last_at_or_before(state_times, as_of)
    last_state_at = state_times[last_state] if last_state >= 0 else None
    known = [t for t in (last_scan_at, last_state_at) if t is not None]
    last_activity = max(known) if known else parsed.ordered_at
    handed = parsed.handed_over_at
    handed_over = handed is not None and handed <= as_of
    stage, stage_since = _delivery_stage(parsed, as_of, handed_over, pushes_collected)
    silent_hours = _silent_hours_since_handover(parsed, as_of, sorted(scan_times + state_times))
    return {
        "hours_since_order": _hours(as_of, parsed.ordered_at),
        "is_handed_over": 1.0 if handed_over else 0.0,
        "hours_since_handover": _hours(as_of, handed) if handed_over else math.nan,
        "hours_since_last_activity": _hours(as_of, last_activity)
        if scans_collected or pushes_collected
        else math.nan,
        "carrier_scans": scan_count if scans_collected else math.nan,
        "hours_since_last_scan": _hours(as_of, last_scan_at),
        "delivery_stage": stage,
        "hours_in_delivery_stage": _hours(as_of, stage_since),
        "silent_hours_since_handover": silent_hours
        if scans_collected or pushes_collected
        else math.nan,
    }


def _delivery_stage(
    parsed: ParsedRequest, as_of: int, handed_over: bool, pushes_collected: bool
) -> tuple[float, int | None]:
    """``features._delivery_stage`` for one posting: the furthest stage and when it was reached."""
    if not pushes_collected:
        return math.nan, None
    number = parsed.posting_number
    pushes = sorted(
        (at, DELIVERY_STAGES[state])
        for n, at, state in parsed.state_changes
        if n == number and state in DELIVERY_STAGES and at <= as_of
    )
    stage, since = 0, parsed.ordered_at
    for position, (at, reached) in enumerate(pushes):
        if position == 0 or reached > stage:
            stage, since = reached, at
    if handed_over and stage < HANDED_OVER_STAGE:
        stage, since = HANDED_OVER_STAGE, parsed.handed_over_at
    return float(stage), since


def _silent_hours_since_handover(
    parsed: ParsedRequest, as_of: int, activity_times: Sequence[int]
) -> float:
    """``features._silent_hours_since_handover`` for one posting (``activity_times`` sorted)."""
    handed = parsed.handed_over_at
    if handed is None or handed > as_of:
        return math.nan
    tolerated = round(TOLERATED_SILENCE_HOURS * _NS_PER_HOUR)
    silent_ns, last = 0, handed
    for at in activity_times:
        if handed <= at <= as_of:
            silent_ns += max(at - last - tolerated, 0)
            last = at
    open_gap = _hours(as_of, last) - TOLERATED_SILENCE_HOURS
    return silent_ns / _NS_PER_HOUR + max(open_gap, 0.0)


def build_listing(parsed: ParsedRequest, as_of: int, pushes_collected: bool) -> dict[str, float]:
    """``features.build_listing`` for one posting."""
    offers = sorted({line.offer_id for line in parsed.lines if line.offer_id is not None})
    edits: dict[str, list[int]] = {}
    for offer_id, at in parsed.card_edits:
        if offer_id is not None:
            edits.setdefault(offer_id, []).append(at)
    if not edits or not offers:
        return {
            "card_edits_since_purchase": 0.0 if pushes_collected else math.nan,
            "hours_since_last_card_edit": math.nan,
        }
    total = 0.0
    last_edit: int | None = None
    for offer_id in offers:
        times = sorted(edits.get(offer_id, ()))
        before = float(_last_at_or_before(times, parsed.ordered_at) + 1)
        latest = _last_at_or_before(times, as_of)
        count = float(latest + 1) if latest >= 0 else 0.0
        total += max(count - before, 0.0)
        if latest >= 0 and times[latest] > parsed.ordered_at:
            last_edit = times[latest] if last_edit is None else max(last_edit, times[latest])
    return {
        "card_edits_since_purchase": total if pushes_collected else math.nan,
        "hours_since_last_card_edit": _hours(as_of, last_edit),
    }


def build_buyer_and_order(parsed: ParsedRequest) -> dict[str, Any]:
    """``features.build_buyer_and_order`` for one posting."""
    values_rub = [
        line.value * RUB_PER_UNIT.get(line.currency, math.nan) if line.currency else math.nan
        for line in parsed.lines
    ]
    all_known = all(not math.isnan(v) for v in values_rub)
    return {
        "region": parsed.region,
        "payment_type": parsed.payment_type,
        "delivery_type": parsed.delivery_type,
        "is_premium": math.nan if parsed.is_premium is None else float(parsed.is_premium),
        "is_legal": math.nan if parsed.is_legal is None else float(parsed.is_legal),
        "total_quantity": _segment_sum([float(line.quantity) for line in parsed.lines]),
        "product_lines": float(len(parsed.lines)),
        "order_value_rub": _segment_sum(values_rub) if all_known else math.nan,
    }


# --- the builder -------------------------------------------------------------------------------


class FastFeatureBuilder:
    """Feature rows of canonical single-posting requests for one model's aggregates."""

    def __init__(self, aggregates: HistoryAggregates | None) -> None:
        if aggregates is None:
            raise ValueError("the fast path needs the history aggregates learned in training")
        self.aggregates = aggregates

    def build_row(self, parsed: ParsedRequest, as_of: int) -> dict[str, Any]:
        """The feature row of ``build_features`` for an open posting, keyed by column, but for
        the :data:`HISTORY_COLUMNS` (:meth:`add_history` adds them)."""
        pushes_collected = self._collected(parsed.first_push_at, PUSH_KINDS, as_of)
        scans_collected = self._collected(parsed.first_scan_at, SCAN_KINDS, as_of)
        row: dict[str, Any] = {}
        row.update(build_price_since_purchase(parsed, as_of))
        row.update(build_carrier_and_promise(parsed, as_of, pushes_collected))
        row.update(build_timeline(parsed, as_of, pushes_collected, scans_collected))
        row.update(build_listing(parsed, as_of, pushes_collected))
        row.update(build_buyer_and_order(parsed))
        return row

    def _collected(self, first_at: int | None, kinds: tuple[str, ...], as_of: int) -> bool:
        """Whether events of ``kinds`` were being archived at ``as_of``: since the request's
        first one or the shop's own start that the model learned, whichever is earlier
        (``features.FeatureContext._collecting_since``)."""
        own = NAT_NS if first_at is None else first_at
        since = earliest_ns(own, self.aggregates.collecting_since(kinds))
        return since != NAT_NS and as_of >= since

    def add_history(
        self, rows: Sequence[dict[str, Any]], parsed: Sequence[ParsedRequest], as_of: Sequence[int]
    ) -> None:
        """Complete rows of :meth:`build_row` with their :data:`HISTORY_COLUMNS`, all looked up
        in one call (concurrent requests and a batch call share it)."""
        history = lookup_history(self.aggregates, parsed, as_of)
        for k, row in enumerate(rows):
            for column in HISTORY_COLUMNS:
                row[column] = history[column][k]


# The event kinds ParsedRequest keeps as pushes; features.PUSH_KINDS is the reference's list.
_PARSED_PUSH_KINDS = frozenset(
    {"state_change", "cancellation", "delivery_date_change", "card_edit"}
)


def fast_path_supports(feature_version: str) -> bool:
    """Whether this module computes the features of ``feature_version`` with this code's
    ingestion and feature definitions."""
    return (
        feature_version == FAST_FEATURE_VERSION == FEATURE_VERSION
        and frozenset(PUSH_KINDS) == _PARSED_PUSH_KINDS
        and {spec.kind for spec in PUSH_SPECS.values()} <= _PARSED_PUSH_KINDS
    )


def build_feature_frame(
    rows: Sequence[Mapping[str, Any]], posting_numbers: Sequence[str]
) -> pd.DataFrame:
    """Feature rows as the frame ``build_features`` returns (same columns, dtypes and index)."""
    data = {}
    for column in FEATURE_COLUMNS:
        values = [row[column] for row in rows]
        if column in CATEGORICAL_COLUMNS:
            data[column] = pd.array(values, dtype="string")
        else:
            data[column] = np.asarray(values, dtype="float64")
    index = pd.Index(list(posting_numbers), dtype="string", name="posting_number")
    return pd.DataFrame(data, index=index)
