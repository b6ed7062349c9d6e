"""One order's timeline: what happened to it, on one time axis, with its risk history above.

:func:`build_timeline` reads the records the book holds about a posting (:class:`ScoreInputs`)
through the same parser as the scorer (:func:`core.ingest.tables_from_objects`) and keeps only
what was known at ``as_of``: state changes and cancellations, carrier scans, the price log of
the posting's offers from the price in force at the order time on, card edits after purchase,
and delivery-date changes. The promised delivery window is the one in force at ``as_of``, read
as the features read it, so the chart shows the promise the score saw.

:func:`render_timeline_svg` draws it as one self-contained, accessible inline SVG (no script,
no external resource, every text escaped, the same bytes for the same input), and
:func:`timeline_rows` gives the same events as table rows: the text alternative to the chart.
Every word shown comes from ``labels`` (the page's language); :data:`DEFAULT_LABELS` fills the
gaps in English.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd

from core.ingest import tables_from_objects
from core.playbook import percent_text
from live.book import ScoreInputs

LANES = ("status", "scan", "price", "card", "promise")
RISK_LEVELS = ("low", "medium", "high")
DAY_NS = 86_400 * 10**9

# Words shown in the chart and the table; the caller's ``labels`` override any of them.
# ``months`` is twelve names separated by spaces, for the axis ticks ("%d %b").
DEFAULT_LABELS: dict[str, str] = {
    "status": "Status",
    "scan": "Carrier scans",
    "price": "Price",
    "card": "Card edits",
    "promise": "Delivery date",
    "risk": "Risk",
    "now": "now",
    "promised delivery": "promised delivery",
    "shipment deadline": "shipment deadline",
    "vs paid": "vs paid",
    "events": "events",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "months": "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
}

# Colours with at least 4.5:1 contrast against white (WCAG AA for text).
TEXT = "#1f2933"
MUTED = "#52606d"
GRID = "#e4e7eb"
LEVEL_COLOURS = {"low": "#2e6b30", "medium": "#8a5a00", "high": "#b03a2e"}
UNKNOWN_LEVEL = MUTED
LANE_COLOURS = {
    "status": TEXT,
    "scan": "#1d4f91",
    "price": "#6b3fa0",
    "card": MUTED,
    "promise": "#0f6e6e",
}
PROMISE_FILL = "#2e6b30"

# Layout, in viewBox units.
WIDTH = 640
LEFT = 104  # lane names and the risk scale
RIGHT = 14
PLOT = WIDTH - LEFT - RIGHT
TOP = 22  # room for the "now" label
RISK_HEIGHT = 110
GAP = 14
LANE_HEIGHT = 26
AXIS_HEIGHT = 30
LANES_TOP = TOP + RISK_HEIGHT + GAP
LANES_BOTTOM = LANES_TOP + LANE_HEIGHT * len(LANES)
HEIGHT = LANES_BOTTOM + AXIS_HEIGHT
TICK_STEPS_DAYS = (1, 2, 3, 5, 7, 14, 30, 61, 91, 182, 365)
MAX_TICKS = 7


@dataclass(frozen=True)
class TimelineEvent:
    """One thing that happened: when (UTC ns), in which lane, its code and its particulars.

    ``code`` is the new state (status lane), the carrier's status (scan), or the lane's own
    name for prices, card edits and promise changes. ``detail`` holds the values shown:
    see :func:`build_timeline`.
    """

    at: int
    lane: str
    code: str
    detail: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Timeline:
    """A posting's history as known at ``as_of`` (times in UTC ns, None when unknown)."""

    posting_number: str
    as_of: int
    ordered_at: int | None
    handed_over_at: int | None  # None also when the hand-over came after as_of
    shipment_deadline_at: int | None
    promised_begin: int | None  # the promise in force at as_of
    promised_end: int | None
    currency: str | None
    paid_unit_prices: Mapping[str, float] = field(hash=False)  # offer_id -> price paid
    events: tuple[TimelineEvent, ...] = ()
    rejected: int = 0  # records that could not be read (see the ingestion's rejects)


# --- building -------------------------------------------------------------------------------------


def _ns(value: Any) -> int | None:
    if value is None or pd.isna(value):
        return None
    return int(pd.Timestamp(value).value)


def _plain(value: Any) -> Any:
    """A table value as a plain Python value (NA -> None)."""
    if value is None or pd.isna(value):
        return None
    if isinstance(value, pd.Timestamp):
        return int(value.value)
    if hasattr(value, "item"):
        return value.item()
    return value


def _pct(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or not base > 0:
        return None
    return round((value / base - 1.0) * 100.0, 2)


PROMISE_KEYS = (
    "delivery_begin_at",
    "delivery_end_at",
    "old_delivery_begin_at",
    "old_delivery_end_at",
)


def _promise_in_force(
    changes: list[dict[str, Any]],
    as_of: int,
    snapshot: tuple[int | None, int | None],
) -> tuple[int | None, int | None]:
    """The promise at ``as_of``, as the features read it: the new dates of the latest change
    at or before it; before the first change, that change's old dates (the promise made at
    the order); without changes, the posting's own promise."""
    if not changes:
        return snapshot
    known = [c for c in changes if c["at"] <= as_of]
    if known:
        latest = known[-1]
        return latest["delivery_begin_at"], latest["delivery_end_at"]
    old_begin, old_end = changes[0]["old_delivery_begin_at"], changes[0]["old_delivery_end_at"]
    return (
        snapshot[0] if old_begin is None else old_begin,
        snapshot[1] if old_end is None else old_end,
    )


def _price_events(
    rows: list[dict[str, Any]],
    ordered_at: int | None,
    as_of: int,
    paid: Mapping[str, float],
    currency_of: Mapping[str, str | None],
) -> list[TimelineEvent]:
    """Each offer's logged prices from the one in force at the order time on, known at as_of.

    Every row of the moment the in-force price was set is kept, as the book sends them.
    """
    events: list[TimelineEvent] = []
    by_offer: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_offer.setdefault(row["offer_id"], []).append(row)
    for offer in sorted(by_offer):
        logged = [r for r in by_offer[offer] if r["at"] <= as_of and r["price"] is not None]
        logged.sort(key=lambda r: (r["at"], r["source_line"] or 0))
        since = None
        if ordered_at is not None:
            since = max((r["at"] for r in logged if r["at"] <= ordered_at), default=None)
        previous: float | None = None
        for row in logged:
            price = float(row["price"])
            if since is None or row["at"] >= since:
                row_currency = row["currency_code"]
                item_currency = currency_of.get(offer)
                comparable = row_currency is None or item_currency in (None, row_currency)
                paid_price = paid.get(offer)
                old_price = row["old_price"]
                events.append(
                    TimelineEvent(
                        row["at"],
                        "price",
                        "price",
                        {
                            "offer_id": offer,
                            "price": price,
                            "old_price": None if old_price is None else float(old_price),
                            "currency_code": row_currency or item_currency,
                            "paid": paid_price,
                            "pct_vs_paid": _pct(price, paid_price) if comparable else None,
                            "previous_price": previous,
                            "at_order": since is not None and row["at"] == since,
                        },
                    )
                )
            previous = price
    return events


def _event_sort_key(event: TimelineEvent) -> tuple[Any, ...]:
    detail = tuple(sorted((key, repr(value)) for key, value in event.detail.items()))
    return (event.at, LANES.index(event.lane), event.code, detail)


def build_timeline(inputs: ScoreInputs, as_of_ns: int) -> Timeline:
    """The posting's timeline as known at ``as_of_ns``.

    Records that cannot be read are counted in ``rejected``, never raised. Details per lane:

    - ``status``: ``state``; a cancellation also ``cancellation: True``, ``reason_id``,
      ``reason``.
    - ``scan``: ``status``, ``location``.
    - ``price``: ``offer_id``, ``price``, ``old_price`` (before discounts, as logged),
      ``currency_code``, ``paid`` (unit price paid), ``pct_vs_paid`` (None when not comparable:
      another currency or nothing paid), ``previous_price`` (the offer's row before), and
      ``at_order`` (the row in force at the order time).
    - ``card``: ``offer_id``, ``sku`` (the push's product_id).
    - ``promise``: ``begin``, ``end`` (the new promise), ``old_begin``, ``old_end``.
    """
    tables = tables_from_objects(
        [inputs.posting], inputs.pushes, inputs.prices, inputs.tracking, source="book"
    )
    number = str(inputs.posting.get("posting_number") or "")
    postings = tables.postings[tables.postings["posting_number"].eq(number).fillna(False)]
    posting = postings.iloc[0].to_dict() if len(postings) else {}
    ordered_at = _ns(posting.get("ordered_at"))
    handed_over_at = _ns(posting.get("handed_over_at"))
    if handed_over_at is not None and handed_over_at > as_of_ns:
        handed_over_at = None

    items = tables.items[tables.items["posting_number"].eq(number).fillna(False)]
    items = items.sort_values("line_no", kind="stable")
    paid: dict[str, float] = {}
    currency_of: dict[str, str | None] = {}
    currencies: list[str] = []
    for item in items.to_dict("records"):
        offer, price = _plain(item["offer_id"]), _plain(item["unit_price"])
        currency = _plain(item["currency_code"])
        if currency is not None and currency not in currencies:
            currencies.append(currency)
        if offer is None or offer in currency_of:
            continue
        currency_of[offer] = currency
        if price is not None and math.isfinite(price):
            paid[offer] = float(price)

    records = [{k: _plain(v) for k, v in row.items()} for row in tables.events.to_dict("records")]
    events: list[TimelineEvent] = []
    price_rows: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    for row in records:
        kind, at = row["kind"], row["at"]
        if kind == "price":
            if row["offer_id"] in currency_of:
                price_rows.append(row)
            continue
        if kind == "card_edit":
            after_order = ordered_at is None or at > ordered_at
            if row["offer_id"] in currency_of and after_order and at <= as_of_ns:
                detail = {"offer_id": row["offer_id"], "sku": row["sku"]}
                events.append(TimelineEvent(at, "card", "card", detail))
            continue
        if row["posting_number"] != number:
            continue
        if kind == "delivery_date_change":
            changes.append(row)
        if at > as_of_ns:
            continue
        if kind == "state_change":
            events.append(TimelineEvent(at, "status", row["state"], {"state": row["state"]}))
        elif kind == "cancellation":
            state = row["state"] or "posting_canceled"
            detail = {
                "state": state,
                "cancellation": True,
                "reason_id": row["reason_id"],
                "reason": row["reason"],
            }
            events.append(TimelineEvent(at, "status", state, detail))
        elif kind == "carrier_scan":
            detail = {"status": row["state"], "location": row["location"]}
            events.append(TimelineEvent(at, "scan", row["state"] or "", detail))
        elif kind == "delivery_date_change":
            detail = {
                "begin": row["delivery_begin_at"],
                "end": row["delivery_end_at"],
                "old_begin": row["old_delivery_begin_at"],
                "old_end": row["old_delivery_end_at"],
            }
            events.append(TimelineEvent(at, "promise", "promise", detail))
    events.extend(_price_events(price_rows, ordered_at, as_of_ns, paid, currency_of))
    events.sort(key=_event_sort_key)

    # By time, then by the dates themselves (unknown first), as the features order them:
    # simultaneous changes resolve the same way whatever order they arrived in.
    changes.sort(key=lambda c: (c["at"], *(-1 if c[k] is None else c[k] for k in PROMISE_KEYS)))
    snapshot = (
        _ns(posting.get("promised_delivery_begin_at")),
        _ns(posting.get("promised_delivery_end_at")),
    )
    promised_begin, promised_end = _promise_in_force(changes, as_of_ns, snapshot)
    return Timeline(
        posting_number=number,
        as_of=as_of_ns,
        ordered_at=ordered_at,
        handed_over_at=handed_over_at,
        shipment_deadline_at=_ns(posting.get("shipment_deadline_at")),
        promised_begin=promised_begin,
        promised_end=promised_end,
        currency=currencies[0] if currencies else None,
        paid_unit_prices=paid,
        events=tuple(events),
        rejected=len(tables.rejects),
    )


# --- words ----------------------------------------------------------------------------------------


def _words(labels: Mapping[str, str]) -> dict[str, str]:
    return {**DEFAULT_LABELS, **{k: v for k, v in labels.items() if isinstance(v, str)}}


def _moment(ns: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)


def format_time(ns: int) -> str:
    """``YYYY-MM-DD HH:MM UTC``: the same in every language."""
    return _moment(ns).strftime("%Y-%m-%d %H:%M UTC")


def _short_time(ns: int | None) -> str:
    return "?" if ns is None else _moment(ns).strftime("%Y-%m-%d %H:%M")


def _day_label(ns: int, words: Mapping[str, str]) -> str:
    """``%d %b`` with the month names of the page's language (never the process locale)."""
    moment = _moment(ns)
    months = words["months"].split()
    if len(months) != 12:
        months = DEFAULT_LABELS["months"].split()
    return f"{moment.day:02d} {months[moment.month - 1]}"


def _money(value: float) -> str:
    return f"{value:.2f}"


def event_text(event: TimelineEvent, labels: Mapping[str, str]) -> str:
    """What the event says, in the page's words (state codes may be given in ``labels``)."""
    words = _words(labels)
    detail = event.detail
    if event.lane == "status":
        text = words.get(event.code, event.code)
        if detail.get("cancellation"):
            reason = detail.get("reason")
            reason_id = detail.get("reason_id")
            if reason and reason_id is not None:
                text += f": {reason} ({reason_id})"
            elif reason or reason_id is not None:
                text += f": {reason or reason_id}"
        return text
    if event.lane == "scan":
        status = detail.get("status")
        parts = [words.get(status, status) if status else "—"]
        if detail.get("location"):
            parts.append(str(detail["location"]))
        return " · ".join(parts)
    if event.lane == "price":
        currency = detail.get("currency_code") or ""
        text = f"{detail.get('offer_id')}: {_money(detail['price'])} {currency}".rstrip()
        if detail.get("pct_vs_paid") is not None:
            text += f" ({detail['pct_vs_paid']:+.1f}% {words['vs paid']})"
        return text
    if event.lane == "card":
        sku = detail.get("sku")
        offer = detail.get("offer_id") or ""
        return f"{offer} ({sku})" if sku is not None else str(offer)
    if event.lane == "promise":
        new = f"{_short_time(detail.get('begin'))} – {_short_time(detail.get('end'))}"
        if detail.get("old_begin") is None and detail.get("old_end") is None:
            return new
        old = f"{_short_time(detail.get('old_begin'))} – {_short_time(detail.get('old_end'))}"
        return f"{old} → {new}"
    return event.code


def timeline_rows(timeline: Timeline, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """The events as rows of the table beside the chart: ``at`` (``YYYY-MM-DD HH:MM UTC``),
    ``at_ns``, ``lane``, ``lane_label``, ``code``, ``text``; in time order."""
    words = _words(labels)
    return [
        {
            "at": format_time(event.at),
            "at_ns": event.at,
            "lane": event.lane,
            "lane_label": words[event.lane],
            "code": event.code,
            "text": event_text(event, words),
        }
        for event in timeline.events
    ]


# --- drawing --------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _f(value: float) -> str:
    return f"{value:.1f}"


class _Axis:
    """Maps UTC ns to x; times before ``start`` (a price set before the order) sit at it."""

    def __init__(self, start: int, end: int) -> None:
        span = max(end - start, DAY_NS)
        pad = span // 30
        self.start, self.end = start - pad, start + span + pad
        self.floor = start

    def x(self, ns: int) -> float:
        ns = max(ns, self.floor)
        return LEFT + (ns - self.start) / (self.end - self.start) * PLOT

    def ticks(self) -> list[int]:
        span_days = (self.end - self.start) / DAY_NS
        step = next((s for s in TICK_STEPS_DAYS if span_days / s <= MAX_TICKS), 365)
        first = -(-self.start // DAY_NS) * DAY_NS  # the first UTC midnight in the domain
        return list(range(first, self.end + 1, step * DAY_NS))


def _level_of(level: str) -> str:
    return level if level in RISK_LEVELS else "unknown"


def _risk_y(probability: float) -> float:
    return TOP + (1.0 - min(max(probability, 0.0), 1.0)) * RISK_HEIGHT


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "posting"


def _label_anchor(x0: float, x1: float) -> str:
    """Where a label of a span (or a line, x0 == x1) goes so that it stays inside the chart:
    from its left edge in the left half, up to its right edge in the right half (a line's label
    is centred on it unless near either side)."""
    if x0 == x1 and LEFT + 40 < x0 < WIDTH - RIGHT - 40:
        return f'x="{_f(x0)}" text-anchor="middle"'
    if (x0 + x1) / 2 <= LEFT + PLOT / 2:
        return f'x="{_f(x0 + 3 if x0 != x1 else x0)}" text-anchor="start"'
    return f'x="{_f(x1 - 3 if x0 != x1 else x1)}" text-anchor="end"'


def _marker(event: TimelineEvent, x: float, y: float) -> str:
    """The lane's shape at (x, y): status circle (a cancellation crossed out), scan square,
    price triangle up/down (dearer/cheaper than paid; a bar when level or unknown), card plus,
    promise diamond."""
    colour = LANE_COLOURS[event.lane]
    if event.lane == "status":
        if event.detail.get("cancellation"):
            high = LEVEL_COLOURS["high"]
            return (
                f'<circle cx="{_f(x)}" cy="{_f(y)}" r="6" fill="{high}"/>'
                f'<path d="M{_f(x - 3)} {_f(y - 3)}l6 6m0 -6l-6 6" stroke="#ffffff" '
                'stroke-width="1.8"/>'
            )
        return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="5" fill="{colour}"/>'
    if event.lane == "scan":
        return f'<rect x="{_f(x - 4.5)}" y="{_f(y - 4.5)}" width="9" height="9" fill="{colour}"/>'
    if event.lane == "price":
        pct = event.detail.get("pct_vs_paid")
        if pct is not None and pct > 0.05:
            points = [(x, y - 6), (x + 6, y + 4.5), (x - 6, y + 4.5)]
        elif pct is not None and pct < -0.05:
            points = [(x, y + 6), (x + 6, y - 4.5), (x - 6, y - 4.5)]
        else:
            x0, y0 = _f(x - 6), _f(y - 2.5)
            return f'<rect x="{x0}" y="{y0}" width="12" height="5" fill="{colour}"/>'
        joined = " ".join(f"{_f(px)},{_f(py)}" for px, py in points)
        return f'<polygon points="{joined}" fill="{colour}"/>'
    if event.lane == "card":
        a, b = 1.8, 5.5
        outline = [
            (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
            (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a),
        ]  # fmt: skip
        joined = " ".join(f"{_f(x + dx)},{_f(y + dy)}" for dx, dy in outline)
        return f'<polygon points="{joined}" fill="{colour}"/>'
    points = [(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)]
    joined = " ".join(f"{_f(px)},{_f(py)}" for px, py in points)
    return f'<polygon points="{joined}" fill="{colour}"/>'


def render_timeline_svg(
    timeline: Timeline,
    risk: Sequence[tuple[int, float, str]],
    *,
    as_of_ns: int,
    thresholds: tuple[float, float] | None,
    labels: Mapping[str, str],
    title: str,
) -> str:
    """The timeline as one inline SVG: the risk history (``(as_of ns, probability, level)``,
    scores after ``as_of_ns`` left out) as a step line above one lane per kind of event, the
    promised delivery window shaded, the shipment deadline and "now" as vertical lines, and a
    UTC date axis. ``thresholds`` is ``(medium, high)``. Scales with its container's width."""
    words = _words(labels)
    scores = sorted(
        (int(at), float(p), str(level))
        for at, p, level in risk
        if at <= as_of_ns and p is not None and math.isfinite(p)
    )
    events = timeline.events
    anchors = [as_of_ns, *(at for at, _, _ in scores)]
    for moment in (
        timeline.ordered_at,
        timeline.handed_over_at,
        timeline.shipment_deadline_at,
        timeline.promised_begin,
        timeline.promised_end,
    ):
        if moment is not None:
            anchors.append(moment)
    floor = timeline.ordered_at
    anchors.extend(e.at for e in events if floor is None or e.at >= floor)
    start = min(anchors) if floor is None else min(floor, *anchors)
    axis = _Axis(start, max(anchors))

    prefix = f"timeline-{_slug(timeline.posting_number)}"
    desc = f"{title}: {len(events)} {words['events']}"
    if scores:
        desc += f"; {words['risk']} {percent_text(scores[0][1], space='')} → "
        desc += percent_text(scores[-1][1], space="")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline-chart" id="{prefix}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" preserveAspectRatio="xMidYMid meet" '
        f'role="img" aria-labelledby="{prefix}-title {prefix}-desc" '
        f'font-family="system-ui, -apple-system, sans-serif" font-size="12" fill="{TEXT}">',
        f'<title id="{prefix}-title">{_e(title)}</title>',
        f'<desc id="{prefix}-desc">{_e(desc)}</desc>',
    ]

    # The promised window, behind everything else.
    if timeline.promised_begin is not None or timeline.promised_end is not None:
        given = [t for t in (timeline.promised_begin, timeline.promised_end) if t is not None]
        begin, end = given[0], given[-1]
        x0, x1 = axis.x(min(begin, end)), axis.x(max(begin, end))
        window = f"{words['promised delivery']}: {_short_time(begin)} – {_short_time(end)} UTC"
        parts.append(
            f'<g class="promise-window"><title>{_e(window)}</title>'
            f'<rect x="{_f(x0)}" y="{TOP}" width="{_f(max(x1 - x0, 2.0))}" '
            f'height="{LANES_BOTTOM - TOP}" fill="{PROMISE_FILL}" fill-opacity="0.12"/>'
            f'<text class="promise-label" {_label_anchor(x0, x1)} y="{LANES_BOTTOM - 4}" '
            f'font-size="10" fill="{LEVEL_COLOURS["low"]}">{_e(words["promised delivery"])}</text>'
            "</g>"
        )

    # Date grid and axis.
    parts.append('<g class="time-axis">')
    for tick in axis.ticks():
        x = _f(axis.x(tick))
        parts.append(
            f'<line class="grid" x1="{x}" y1="{TOP}" x2="{x}" y2="{LANES_BOTTOM}" '
            f'stroke="{GRID}" stroke-width="1"/>'
            f'<line class="tick" x1="{x}" y1="{LANES_BOTTOM}" x2="{x}" y2="{LANES_BOTTOM + 5}" '
            f'stroke="{MUTED}"/>'
            f'<text class="tick-label" x="{x}" y="{LANES_BOTTOM + 17}" text-anchor="middle" '
            f'fill="{MUTED}">{_e(_day_label(tick, words))}</text>'
        )
    parts.append(
        f'<line x1="{LEFT}" y1="{LANES_BOTTOM}" x2="{WIDTH - RIGHT}" y2="{LANES_BOTTOM}" '
        f'stroke="{MUTED}"/></g>'
    )

    # The risk panel: scale, thresholds, step line, points.
    parts.append('<g class="risk-panel">')
    parts.append(
        f'<text class="risk-label" x="4" y="{TOP + 12}" font-weight="bold">'
        f"{_e(words['risk'])}</text>"
    )
    for share in (0.0, 0.5, 1.0):
        y = _f(_risk_y(share))
        parts.append(
            f'<line class="risk-grid" x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}" '
            f'stroke="{GRID}"/>'
            f'<text x="{LEFT - 6}" y="{_f(_risk_y(share) + 4)}" text-anchor="end" '
            f'fill="{MUTED}">{share:.0%}</text>'
        )
    if thresholds is not None:
        for level, value in zip(("medium", "high"), thresholds, strict=True):
            y = _f(_risk_y(value))
            text = f"{words[level]} ≥ {value:.0%}"
            parts.append(
                f'<g class="threshold threshold-{level}"><title>{_e(text)}</title>'
                f'<line x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}" '
                f'stroke="{LEVEL_COLOURS[level]}" stroke-width="1" stroke-dasharray="5 4"/>'
                f'<text x="{WIDTH - RIGHT}" y="{_f(_risk_y(value) - 3)}" text-anchor="end" '
                f'font-size="9" fill="{LEVEL_COLOURS[level]}">{_e(text)}</text></g>'
            )
    if scores:
        vertices: list[tuple[float, float]] = []
        for k, (at, p, _) in enumerate(scores):
            x, y = axis.x(at), _risk_y(p)
            if k:
                vertices.append((x, vertices[-1][1]))
            vertices.append((x, y))
        if as_of_ns > scores[-1][0]:
            vertices.append((axis.x(as_of_ns), vertices[-1][1]))
        joined = " ".join(f"{_f(x)},{_f(y)}" for x, y in vertices)
        parts.append(
            f'<polyline class="risk-line" points="{joined}" fill="none" stroke="{TEXT}" '
            'stroke-width="1.5" stroke-linejoin="round"/>'
        )
        for at, p, level in scores:
            known = _level_of(level)
            colour = LEVEL_COLOURS.get(known, UNKNOWN_LEVEL)
            tip = f"{format_time(at)} — {words['risk']}: {percent_text(p, space='')} "
            tip += f"({words.get(level, level)})"
            parts.append(
                f'<g class="risk-point risk-{known}"><title>{_e(tip)}</title>'
                f'<circle cx="{_f(axis.x(at))}" cy="{_f(_risk_y(p))}" r="3.5" fill="{colour}" '
                'stroke="#ffffff" stroke-width="1"/></g>'
            )
    parts.append("</g>")

    # The lanes and their events.
    parts.append('<g class="lanes">')
    for k, lane in enumerate(LANES):
        top = LANES_TOP + k * LANE_HEIGHT
        parts.append(
            f'<g class="lane lane-{lane}">'
            f'<line x1="{LEFT}" y1="{top}" x2="{WIDTH - RIGHT}" y2="{top}" stroke="{GRID}"/>'
            f'<text class="lane-label" x="{LEFT - 6}" y="{top + LANE_HEIGHT / 2 + 4:.1f}" '
            f'text-anchor="end">{_e(words[lane])}</text></g>'
        )
    for event in events:
        x = axis.x(event.at)
        y = LANES_TOP + (LANES.index(event.lane) + 0.5) * LANE_HEIGHT
        tip = f"{format_time(event.at)} — {words[event.lane]}: {event_text(event, words)}"
        classes = f"event event-{event.lane}"
        if event.detail.get("cancellation"):
            classes += " event-cancellation"
        if event.at < axis.floor:
            classes += " event-before-order"
        parts.append(
            f'<g class="{classes}" data-at="{_e(format_time(event.at))}" '
            f'data-code="{_e(event.code)}"><title>{_e(tip)}</title>{_marker(event, x, y)}</g>'
        )
    parts.append("</g>")

    # The shipment deadline and "now", on top.
    if timeline.shipment_deadline_at is not None:
        x = _f(axis.x(timeline.shipment_deadline_at))
        tip = f"{words['shipment deadline']}: {format_time(timeline.shipment_deadline_at)}"
        parts.append(
            f'<g class="deadline-line"><title>{_e(tip)}</title>'
            f'<line x1="{x}" y1="{TOP}" x2="{x}" y2="{LANES_BOTTOM}" stroke="{MUTED}" '
            'stroke-width="1.2" stroke-dasharray="2 3"/></g>'
        )
    now_x = axis.x(as_of_ns)
    x = _f(now_x)
    parts.append(
        f'<g class="now-line"><title>{_e(words["now"])}: {_e(format_time(as_of_ns))}</title>'
        f'<line x1="{x}" y1="{TOP - 4}" x2="{x}" y2="{LANES_BOTTOM}" stroke="{TEXT}" '
        'stroke-width="1.5"/>'
        f'<text class="now-label" {_label_anchor(now_x, now_x)} y="{TOP - 8}" font-weight="bold">'
        f"{_e(words['now'])}</text></g>"
    )
    parts.append("</svg>")
    return "".join(parts)
