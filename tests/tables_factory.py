"""Build small :class:`HistoryTables` by hand, for tests.

Write rows as plain dicts (timestamps as ISO strings or ``pd.Timestamp``; naive means UTC) and
let :func:`make_tables` give them the canonical columns and dtypes of ``core.tables``
(missing columns become NA). The row builders fill only what almost every test needs, so a test
states the facts it is about and nothing else::

    tables = make_tables(
        postings=[posting_row("P1", "2026-03-01 10:00", carrier_id=7)],
        items=[item_row("P1", offer_id="A", unit_price=1000.0)],
        events=[event_row("price", "2026-03-02", offer_id="A", price=900.0)],
    )

:func:`random_histories` is a Hypothesis strategy for small but messy histories (several
postings per customer, multi-line orders, every event kind, cancellations by everyone) with a
moment ``as_of`` inside them, for point-in-time properties; :func:`random_shop` is a seeded shop
of a few hundred orders, for training sets and splits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import strategies as st

from core.tables import (
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    POSTING_COLUMNS,
    PRODUCT_COLUMNS,
    REJECT_COLUMNS,
    HistoryTables,
    LoadReport,
    conform,
)

Row = Mapping[str, Any]


def utc(value: str | pd.Timestamp) -> pd.Timestamp:
    """A UTC nanosecond timestamp; a naive value is taken as UTC."""
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.as_unit("ns")


def _frame(rows: Iterable[Row], columns: dict[str, str]) -> pd.DataFrame:
    rows = [dict(row) for row in rows]
    unknown = {key for row in rows for key in row} - set(columns)
    if unknown:
        raise KeyError(f"not columns of this table: {sorted(unknown)}")
    raw = pd.DataFrame(rows, columns=list(columns)) if rows else pd.DataFrame(columns=[])
    # object columns first: conform casts each to its canonical dtype.
    return conform(raw.astype(object), columns)


def make_tables(
    postings: Iterable[Row] = (),
    items: Iterable[Row] = (),
    events: Iterable[Row] = (),
    products: Iterable[Row] = (),
    rejects: Iterable[Row] = (),
) -> HistoryTables:
    """A :class:`HistoryTables` from row dicts; unknown keys raise, missing columns are NA."""
    postings_frame = _frame(postings, POSTING_COLUMNS)
    report = LoadReport(
        postings_read=len(postings_frame),
        postings_kept=len(postings_frame),
    )
    return HistoryTables(
        postings=postings_frame,
        items=_frame(items, ITEM_COLUMNS),
        events=_frame(events, EVENT_COLUMNS),
        products=_frame(products, PRODUCT_COLUMNS),
        rejects=_frame(rejects, REJECT_COLUMNS),
        report=report,
    )


def posting_row(posting_number: str, ordered_at: str | pd.Timestamp, **fields: Any) -> dict:
    """A posting ordered at ``ordered_at``: FBS, awaiting packaging, unless ``fields`` say else."""
    return {
        "posting_number": posting_number,
        "ordered_at": utc(ordered_at),
        "scheme": "fbs",
        "status": "awaiting_packaging",
        **fields,
    }


def item_row(posting_number: str, **fields: Any) -> dict:
    """A product line: line 0, one unit of SKU 1 / offer ``"A"`` at 1000 RUB, unless overridden."""
    return {
        "posting_number": posting_number,
        "line_no": 0,
        "sku": 1,
        "offer_id": "A",
        "quantity": 1,
        "unit_price": 1000.0,
        "currency_code": "RUB",
        **fields,
    }


def event_row(kind: str, at: str | pd.Timestamp, **fields: Any) -> dict:
    """An event of ``kind`` (one of ``core.tables.EVENT_KINDS``) at ``at``."""
    return {"kind": kind, "at": utc(at), **fields}


# --- random histories for property tests ------------------------------------------------------

START = utc("2026-01-01")
HOUR = pd.Timedelta(hours=1)
OFFERS = ("A", "B", "C")
REGIONS = ("Moscow", "Kazan", None)
CANCELLERS = ("buyer", "buyer", "seller", "ozon", "system", "delivery", "unknown")


def _moment(draw: st.DrawFn, low: int = 0, high: int = 24 * 30) -> pd.Timestamp:
    return START + draw(st.integers(low, high)) * HOUR


@st.composite
def _posting(draw: st.DrawFn, number: int) -> tuple[dict, list[dict], list[dict]]:
    """One posting with its lines and its own events (scans, pushes, date changes)."""
    name = f"P{number}"
    ordered_at = _moment(draw)
    promise_end = ordered_at + draw(st.integers(24, 24 * 10)) * HOUR
    fields: dict[str, Any] = {
        "carrier_id": draw(st.sampled_from([1, 2, 3, None])),
        "region": draw(st.sampled_from(REGIONS)),
        "payment_type": draw(st.sampled_from(["prepaid", "on_delivery"])),
        "customer_id": draw(st.sampled_from([100, 101, 102, None])),
        "is_premium": draw(st.booleans()),
        "shipment_deadline_at": ordered_at + 48 * HOUR,
        "promised_delivery_begin_at": promise_end - 24 * HOUR,
        "promised_delivery_end_at": promise_end,
    }
    end = draw(st.sampled_from(["open", "delivered", "cancelled", "cancelled_untimed"]))
    closed_at = ordered_at + draw(st.integers(0, 24 * 15)) * HOUR
    if end == "delivered":
        fields.update(status="delivered", delivered_at=closed_at)
    elif end == "cancelled":
        fields.update(
            status="cancelled",
            cancelled_at=closed_at,
            cancelled_by=draw(st.sampled_from(CANCELLERS)),
        )
    elif end == "cancelled_untimed":
        fields.update(status="cancelled", cancelled_by="buyer")
    if draw(st.booleans()):
        fields["handed_over_at"] = ordered_at + draw(st.integers(1, 72)) * HOUR

    lines = [
        item_row(
            name,
            line_no=line,
            offer_id=offer,
            sku=OFFERS.index(offer) + 1,
            quantity=draw(st.integers(1, 3)),
            unit_price=float(draw(st.integers(100, 2000))),
            currency_code=draw(st.sampled_from(["RUB", "RUB", "CNY"])),
        )
        for line, offer in enumerate(
            draw(st.lists(st.sampled_from(OFFERS), min_size=1, max_size=3, unique=True))
        )
    ]
    events = [
        event_row(
            kind, ordered_at + draw(st.integers(0, 24 * 12)) * HOUR, posting_number=name, state=kind
        )
        for kind in draw(st.lists(st.sampled_from(["carrier_scan", "state_change"]), max_size=4))
    ]
    promise = (promise_end - 24 * HOUR, promise_end)
    change_at = ordered_at
    for shift in draw(st.lists(st.integers(-48, 96), max_size=2)):
        change_at = change_at + draw(st.integers(1, 96)) * HOUR
        new = (promise[0] + shift * HOUR, promise[1] + shift * HOUR)
        events.append(
            event_row(
                "delivery_date_change",
                change_at,
                posting_number=name,
                old_delivery_begin_at=promise[0],
                old_delivery_end_at=promise[1],
                delivery_begin_at=new[0],
                delivery_end_at=new[1],
            )
        )
        promise = new
    # The snapshot holds the latest promise, as an export would.
    fields["promised_delivery_begin_at"], fields["promised_delivery_end_at"] = promise
    return posting_row(name, ordered_at, **fields), lines, events


@st.composite
def _offer_events(draw: st.DrawFn) -> list[dict]:
    """Price log rows and card-edit pushes of the shop's offers."""
    events = []
    for offer in OFFERS:
        for _ in range(draw(st.integers(0, 4))):
            price = float(draw(st.integers(100, 2000)))
            old = draw(st.sampled_from([None, price, price * 1.2]))
            events.append(
                event_row(
                    "price",
                    _moment(draw),
                    offer_id=offer,
                    price=price,
                    old_price=old,
                    currency_code=draw(st.sampled_from(["RUB", None, "CNY"])),
                )
            )
        for _ in range(draw(st.integers(0, 2))):
            events.append(event_row("card_edit", _moment(draw), offer_id=offer))
    return events


@st.composite
def random_histories(draw: st.DrawFn, max_postings: int = 6) -> tuple[HistoryTables, pd.Timestamp]:
    """A small random history and a moment ``as_of`` inside its time span."""
    n = draw(st.integers(1, max_postings))
    postings, items, events = [], [], []
    for number in range(n):
        posting, lines, posting_events = draw(_posting(number))
        postings.append(posting)
        items.extend(lines)
        events.extend(posting_events)
    events.extend(draw(_offer_events()))
    as_of = _moment(draw, 0, 24 * 40)
    return make_tables(postings=postings, items=items, events=events), as_of


def random_shop(
    n_postings: int = 300, days: int = 60, seed: int = 0
) -> tuple[HistoryTables, pd.Timestamp]:
    """A seeded shop of ``n_postings`` orders over ``days`` days and its export moment.

    Large enough for splits and rates (a few carriers, regions, offers and repeat customers),
    small enough for a unit test: every outcome occurs (delivered, buyer, seller and system
    cancellations, untimed cancellations, still open at export), with a carrier scan per posting
    and a weekly price log. Returns the tables and the export moment (the end of the period).
    """
    rng = np.random.default_rng(seed)
    export_at = START + pd.Timedelta(days=days)
    postings, items, events = [], [], []
    for number in range(n_postings):
        name = f"S{number:05d}"
        ordered_at = START + pd.Timedelta(minutes=int(rng.integers(0, days * 24 * 60)))
        closes_at = ordered_at + pd.Timedelta(hours=int(rng.integers(1, 24 * 12)))
        outcome = rng.choice(
            ["delivered", "buyer", "seller", "system", "untimed"], p=[0.7, 0.15, 0.06, 0.04, 0.05]
        )
        fields: dict[str, Any] = {
            "carrier_id": int(rng.integers(1, 5)),
            "region": str(rng.choice(["Moscow", "Kazan", "Omsk"])),
            "payment_type": str(rng.choice(["prepaid", "on_delivery"])),
            "customer_id": int(rng.integers(1, max(n_postings // 3, 2))),
            "shipment_deadline_at": ordered_at + 48 * HOUR,
            "promised_delivery_end_at": ordered_at + 120 * HOUR,
        }
        if closes_at > export_at:
            pass  # still open at export
        elif outcome == "delivered":
            fields.update(status="delivered", delivered_at=closes_at)
        elif outcome == "untimed":
            fields.update(status="cancelled", cancelled_by="buyer")
        else:
            fields.update(status="cancelled", cancelled_at=closes_at, cancelled_by=str(outcome))
        postings.append(posting_row(name, ordered_at, **fields))
        offer = str(rng.choice(OFFERS))
        items.append(item_row(name, offer_id=offer, sku=OFFERS.index(offer) + 1, unit_price=1000.0))
        scan_at = ordered_at + pd.Timedelta(hours=int(rng.integers(1, 48)))
        events.append(event_row("carrier_scan", scan_at, posting_number=name, state="accepted"))
    for offer in OFFERS:
        for day in range(0, days, 7):
            events.append(
                event_row(
                    "price",
                    START + pd.Timedelta(days=day),
                    offer_id=offer,
                    price=float(rng.integers(800, 1200)),
                )
            )
    return make_tables(postings=postings, items=items, events=events), export_at


@st.composite
def rewritten_futures(draw: st.DrawFn, tables: HistoryTables, as_of: pd.Timestamp) -> HistoryTables:
    """``tables`` with everything after ``as_of`` redrawn; nothing at or before it changes.

    Postings open at ``as_of`` get another ending (delivered, cancelled by the buyer or the
    seller, or still open) and handover after ``as_of``; postings ordered later get new outcomes;
    new postings ordered after ``as_of`` are added; events (prices, scans, state pushes, card
    edits, cancellation pushes, delivery-date changes) are appended after ``as_of``. The rewrite
    stays a history an export could hold: a date change starts from the promise in force and
    the snapshot promise becomes its new dates. Endings without a time are not drawn: such a
    posting cannot be placed in time at all.
    """
    postings = tables.postings.copy()
    ordered = postings["ordered_at"]
    closed = postings[["cancelled_at", "delivered_at"]].min(axis=1)
    untimed = postings["status"].isin(["delivered", "cancelled"]) & closed.isna()
    rewritable = (ordered > as_of) | ((closed.isna() | (closed > as_of)) & ~untimed)

    def later() -> pd.Timestamp:
        return as_of + draw(st.integers(1, 24 * 20)) * HOUR

    endings = {
        column: postings[column].tolist()
        for column in ("cancelled_at", "delivered_at", "cancelled_by", "status", "handed_over_at")
    }
    for position in np.flatnonzero(rewritable.to_numpy()):
        start = max(as_of, ordered.iloc[position])
        end_at = start + draw(st.integers(1, 24 * 20)) * HOUR
        ending = draw(st.sampled_from(["open", "delivered", "buyer", "seller"]))
        endings["cancelled_at"][position] = end_at if ending in ("buyer", "seller") else None
        endings["delivered_at"][position] = end_at if ending == "delivered" else None
        endings["cancelled_by"][position] = ending if ending in ("buyer", "seller") else None
        endings["status"][position] = {"open": "delivering", "delivered": "delivered"}.get(
            ending, "cancelled"
        )
        handed = endings["handed_over_at"][position]
        if pd.isna(handed) or handed > as_of:
            endings["handed_over_at"][position] = draw(st.sampled_from([None, later()]))
    for column, values in endings.items():
        postings[column] = pd.Series(values, dtype=object).astype(POSTING_COLUMNS[column])

    new_postings, new_items = [], []
    for number in range(draw(st.integers(0, 2))):
        name = f"F{number}"
        new_postings.append(
            posting_row(
                name,
                later(),
                carrier_id=draw(st.sampled_from([1, 2, 3])),
                region=draw(st.sampled_from(REGIONS)),
                customer_id=draw(st.sampled_from([100, 101, 102])),
                status="cancelled",
                cancelled_by="buyer",
                cancelled_at=later() + 24 * 30 * HOUR,
            )
        )
        new_items.append(item_row(name, offer_id=draw(st.sampled_from(OFFERS)), sku=1))

    numbers = postings["posting_number"].tolist()
    new_events = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["price", "carrier_scan", "state_change", "card_edit"]))
        if kind in ("price", "card_edit"):
            new_events.append(
                event_row(
                    kind,
                    later(),
                    offer_id=draw(st.sampled_from(OFFERS)),
                    price=float(draw(st.integers(50, 3000))),
                    old_price=5000.0,
                )
            )
        else:
            new_events.append(
                event_row(kind, later(), posting_number=draw(st.sampled_from(numbers)))
            )
    for position in np.flatnonzero(postings["cancelled_at"].gt(as_of).to_numpy()):
        new_events.append(
            event_row(
                "cancellation",
                postings["cancelled_at"].iloc[position],
                posting_number=numbers[position],
            )
        )
    new_events.extend(_later_date_changes(draw, postings, tables.events, as_of))
    return HistoryTables(
        postings=conform(
            pd.concat([postings, _frame(new_postings, POSTING_COLUMNS)], ignore_index=True),
            POSTING_COLUMNS,
        ),
        items=conform(
            pd.concat([tables.items, _frame(new_items, ITEM_COLUMNS)], ignore_index=True),
            ITEM_COLUMNS,
        ),
        events=conform(
            pd.concat([tables.events, _frame(new_events, EVENT_COLUMNS)], ignore_index=True),
            EVENT_COLUMNS,
        ),
        products=tables.products,
        rejects=tables.rejects,
        report=tables.report,
    )


def _later_date_changes(
    draw: st.DrawFn, postings: pd.DataFrame, events: pd.DataFrame, as_of: pd.Timestamp
) -> list[dict]:
    """Delivery-date changes after ``as_of`` (and after each posting's last change), chained.

    Updates ``postings``' snapshot promise in place to the last new dates, as an export would.
    """
    changes = events[events["kind"] == "delivery_date_change"]
    last_change = changes.groupby("posting_number")["at"].max()
    out = []
    for position in draw(st.lists(st.integers(0, len(postings) - 1), max_size=2, unique=True)):
        index = postings.index[position]
        number = postings.at[index, "posting_number"]
        at = max(as_of, last_change.get(number, as_of)) + draw(st.integers(1, 72)) * HOUR
        old = (
            postings.at[index, "promised_delivery_begin_at"],
            postings.at[index, "promised_delivery_end_at"],
        )
        shift = draw(st.integers(-24, 96)) * HOUR
        new = (old[0] + shift, old[1] + shift)
        out.append(
            event_row(
                "delivery_date_change",
                at,
                posting_number=number,
                old_delivery_begin_at=old[0],
                old_delivery_end_at=old[1],
                delivery_begin_at=new[0],
                delivery_end_at=new[1],
            )
        )
        postings.loc[index, ["promised_delivery_begin_at", "promised_delivery_end_at"]] = new
    return out
