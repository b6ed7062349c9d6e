"""The request lane: one posting of a REST request, parsed straight into feature columns.

:func:`parse_request` reads a request whose every value has the canonical form of the Seller
API and the contract (ISO-8601 timestamps, JSON numbers or plain decimal strings, integer ids,
...) and in which no record would be rejected, and :func:`requests_history` gives the
:class:`core.columns.HistoryColumns` that ingestion's tables give for the same records. The
features are then the one definition's (:func:`core.features.build_feature_columns`): this
module holds no feature of its own. Values are read by ingestion's own readers
(:mod:`core.ingest.values`). It exists because ingestion's tables cost ~100 ms for one posting
(a few dozen small DataFrames) and this lane ~0.4 ms; :func:`requests_history` puts the requests
that wait together into one history, so the features run once for all of them.

Anything else raises :class:`NotCanonical` and the caller takes the reference route
(``tables_from_objects`` + ``build_features``), which also words the 422 messages. Each time a
model is loaded both routes score probe requests and must agree
(:meth:`serving.scoring.ModelScorer.check_fast_path`); ``tests/test_parity_property.py`` draws
whole archives and checks every open posting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import core.ingest.events as ingest_events
from core.columns import (
    EVENT_FIELDS,
    ITEM_FIELDS,
    KEY,
    NUMBER,
    POSTING_FIELDS,
    TIME,
    Columns,
    HistoryColumns,
)
from core.ingest.events import DELIVERED_STATES, PUSH_SPECS
from core.ingest.postings import MAX_QUANTITY
from core.ingest.values import (
    NotCanonical,
    parse_bool,
    parse_decimal,
    parse_integer,
    parse_text,
    parse_timestamp,
)
from core.point_in_time import NAT_NS
from core.tables import PUSH_KINDS, SCAN_KINDS, TERMINAL_STATUSES

_EMPTY: dict[str, Any] = {}

# Time keys the ingestion fills in itself (a push dated by its neighbours): the reference path's.
_DERIVED_TIME_KEYS = frozenset(
    key for key in (getattr(ingest_events, "NEXT_PUSH_AT", None),) if key is not None
)


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


def _empty_events() -> dict[str, list[list[Any]]]:
    return {kind: [[] for _ in fields] for kind, fields in EVENT_FIELDS.items()}


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
    # Per event kind, its columns as lists in the order of core.columns.EVENT_FIELDS.
    events: dict[str, list[list[Any]]] = field(default_factory=_empty_events)

    def add_to(self, columns: _ColumnLists, tag: str) -> None:
        """Append the request's records to ``columns``, posting numbers and offer ids tagged."""
        number = tag + self.posting_number

        def tagged(value: str | None) -> str | None:
            return None if value is None else tag + value

        posting = columns.postings
        for name, value in (
            ("posting_number", number),
            ("ordered_at", self.ordered_at),
            ("shipment_deadline_at", self.shipment_deadline_at),
            ("handed_over_at", self.handed_over_at),
            ("promised_delivery_begin_at", self.promised_begin_at),
            ("promised_delivery_end_at", self.promised_end_at),
            ("carrier_id", self.carrier_id),
            ("region", self.region),
            ("payment_type", self.payment_type),
            ("delivery_type", self.delivery_type),
            ("is_premium", self.is_premium),
            ("is_legal", self.is_legal),
            ("customer_id", self.customer_id),
        ):
            posting[name].append(value)
        items = columns.items
        for line in self.lines:
            items["posting_number"].append(number)
            items["line_no"].append(line.line_no)
            items["sku"].append(line.sku)
            items["offer_id"].append(tagged(line.offer_id))
            items["quantity"].append(line.quantity)
            items["unit_price"].append(line.unit_price)
            items["currency_code"].append(line.currency)
        for kind, fields in EVENT_FIELDS.items():
            for name, target, values in zip(
                fields, columns.events[kind], self.events[kind], strict=True
            ):
                if tag and name in _TAGGED_KEYS:
                    values = [tagged(value) for value in values]
                target.extend(values)

    def first_at(self, kinds: tuple[str, ...]) -> int:
        """The earliest time of the request's events of ``kinds``; NaT for none."""
        times = [at for kind in kinds for at in self.events[kind][0]]
        return min(times) if times else NAT_NS


@dataclass
class _ColumnLists:
    """Columns being filled as Python lists, in the fields' order of :mod:`core.columns`."""

    postings: dict[str, list[Any]] = field(
        default_factory=lambda: {name: [] for name in POSTING_FIELDS}
    )
    items: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in ITEM_FIELDS})
    events: dict[str, list[list[Any]]] = field(default_factory=_empty_events)

    def to_columns(self) -> tuple[Columns, Columns, dict[str, Columns]]:
        by_kind = {}
        for kind, lists in self.events.items():
            fields = EVENT_FIELDS[kind]
            by_kind[kind] = _columns(len(lists[0]), fields, dict(zip(fields, lists, strict=True)))
        postings = _columns(len(self.postings["posting_number"]), POSTING_FIELDS, self.postings)
        items = _columns(len(self.items["posting_number"]), ITEM_FIELDS, self.items)
        return postings, items, by_kind


def _columns(length: int, fields: dict[str, str], values: dict[str, Sequence[Any]]) -> Columns:
    convert = {TIME: _times, NUMBER: _numbers, KEY: _keys}
    return Columns(length, {name: convert[kind](values[name]) for name, kind in fields.items()})


def requests_history(requests: Sequence[ParsedRequest]) -> tuple[HistoryColumns, np.ndarray]:
    """Several requests as one history, each request seeing only its own records, and the
    (tagged) posting number of each request's posting in it.

    Concurrent requests and a batch call thus cost one pass of the features. Posting numbers
    and offer ids are tagged with the request's position (a lone request keeps its own); each
    posting keeps the collection start of its own request's pushes and scans.
    """
    lists = _ColumnLists()
    tags = [""] if len(requests) == 1 else [f"{k}{_TAG_END}" for k in range(len(requests))]
    for request, tag in zip(requests, tags, strict=True):
        request.add_to(lists, tag)
    postings, items, by_kind = lists.to_columns()
    history = HistoryColumns(postings=postings, items=items, events_by_kind=by_kind)
    if len(requests) > 1:
        for kinds in (PUSH_KINDS, SCAN_KINDS):
            starts = [request.first_at(kinds) for request in requests]
            history.collecting_since[kinds] = np.array(starts, dtype="int64")
    return history, postings["posting_number"]


# The key columns a request's tag goes before (posting numbers and offer ids are joined on).
_TAGGED_KEYS = frozenset({"posting_number", "offer_id"})
# Ends a request's tag: a control character, so "1" + TAG_END + "2..." never reads as request 12.
_TAG_END = "\x1f"


def _times(values: Sequence[int | None]) -> np.ndarray:
    return np.array([NAT_NS if value is None else value for value in values], dtype="int64")


def _numbers(values: Sequence[float | bool | None]) -> np.ndarray:
    return np.array([math.nan if value is None else value for value in values], dtype="float64")


def _keys(values: Sequence[Any]) -> np.ndarray:
    keys = np.empty(len(values), dtype=object)
    keys[:] = values
    return keys


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
        _append(parsed.events["card_edit"], at, offer_id)
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
        _append(parsed.events["state_change"], at, number, state)
    elif spec.kind == "cancellation":
        _append(parsed.events["cancellation"], at, number)
    elif spec.kind == "delivery_date_change":
        _append(
            parsed.events["delivery_date_change"],
            at,
            number,
            parse_timestamp(push.get("new_delivery_date_begin")),
            parse_timestamp(push.get("new_delivery_date_end")),
            parse_timestamp(push.get("old_delivery_date_begin")),
            parse_timestamp(push.get("old_delivery_date_end")),
        )
    else:
        raise NotCanonical  # a posting push kind this path does not know


def price_row_values(row: Any) -> tuple[int, str, float, float | None, str | None]:
    """``at, offer_id, price, old_price, currency_code`` of a canonical price-log row that
    ``build_price_events`` would keep; :class:`NotCanonical` for anything else."""
    if type(row) is not dict:
        raise NotCanonical
    offer_id = parse_text(row.get("offer_id"))
    at = parse_timestamp(row.get("at"))
    price = parse_decimal(row.get("price"))
    if offer_id is None or at is None or price is None or price < 0:
        raise NotCanonical
    return (
        at,
        offer_id,
        price,
        parse_decimal(row.get("old_price")),
        parse_text(row.get("currency_code")),
    )


def scan_row_values(row: Any) -> tuple[int, str]:
    """``at, posting_number`` of a canonical carrier-scan row that ``build_scan_events`` would
    keep; :class:`NotCanonical` for anything else."""
    if type(row) is not dict:
        raise NotCanonical
    number = parse_text(row.get("posting_number"))
    at = parse_timestamp(row.get("at"))
    if number is None or at is None:
        raise NotCanonical
    return at, number


def _add_price_row(parsed: ParsedRequest, row: Any) -> None:
    """One price-log row, mirroring ``build_price_events``."""
    _append(parsed.events["price"], *price_row_values(row))


def _add_scan_row(parsed: ParsedRequest, row: Any) -> None:
    """One carrier-scan row, mirroring ``build_scan_events``."""
    _append(parsed.events["carrier_scan"], *scan_row_values(row))


def _append(columns: list[list[Any]], *values: Any) -> None:
    for column, value in zip(columns, values, strict=True):
        column.append(value)


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
    cancel_times, cancel_numbers = parsed.events["cancellation"]
    cancel_at = min(
        (at for n, at in zip(cancel_numbers, cancel_times, strict=True) if n == number),
        default=None,
    )
    state_times, state_numbers, states = parsed.events["state_change"]
    deliver_at = min(
        (
            at
            for n, at, state in zip(state_numbers, state_times, states, strict=True)
            if n == number and state in DELIVERED_STATES
        ),
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
