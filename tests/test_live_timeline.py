"""One order's timeline for the dashboard: what it keeps at ``as_of``, and the SVG it draws.

What they prove: nothing known after ``as_of`` is shown; a price change after purchase shows
its change against the price paid, and only the posting's offers' prices from the one in force
at the order count; a delivery-date change moves the promised window; the SVG is well-formed
XML with one titled marker per event, one risk point per score, the "now" line and the page's
words; the same records give the same bytes; and an empty history still draws.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pandas as pd

from live.book import ScoreInputs
from live.timeline import (
    DEFAULT_LABELS,
    LANES,
    Timeline,
    build_timeline,
    render_timeline_svg,
    timeline_rows,
)

SVG = "{http://www.w3.org/2000/svg}"
ZH = {
    "status": "状态",
    "scan": "物流扫描",
    "price": "价格",
    "card": "商品卡编辑",
    "promise": "送达日期",
    "risk": "风险",
    "now": "现在",
    "promised delivery": "承诺送达",
    "events": "个事件",
}
RU = {"status": "Статус", "scan": "Сканы", "price": "Цена", "card": "Карточка"}


def ns(text: str) -> int:
    return int(pd.Timestamp(text).value)


def posting(**extra: Any) -> dict[str, Any]:
    """A posting as the Seller API returns it (the contract's shape)."""
    return {
        "posting_number": "48213907-0114-1",
        "order_id": 42,
        "status": "awaiting_deliver",
        "in_process_at": "2026-04-10T08:15:00Z",
        "shipment_date": "2026-04-11T12:00:00Z",
        "tracking_number": "",
        "delivery_method": {"id": 1, "tpl_provider_id": 24, "tpl_provider": "Ozon Логистика"},
        "cancellation": None,
        "analytics_data": {
            "region": "Москва",
            "delivery_date_begin": "2026-04-14T00:00:00Z",
            "delivery_date_end": "2026-04-15T00:00:00Z",
        },
        "products": [
            {
                "sku": 7,
                "offer_id": "A-7",
                "name": "Лампа",
                "price": "1000.000000",
                "quantity": 1,
                "currency_code": "RUB",
            }
        ],
        **extra,
    }


def state(new_state: str, at: str) -> dict[str, Any]:
    return {
        "message_type": "TYPE_STATE_CHANGED",
        "posting_number": "48213907-0114-1",
        "new_state": new_state,
        "changed_state_date": at,
        "warehouse_id": 1,
        "seller_id": 9,
    }


def date_change(received_at: str, begin: str, end: str) -> dict[str, Any]:
    return {
        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
        "posting_number": "48213907-0114-1",
        "new_delivery_date_begin": begin,
        "new_delivery_date_end": end,
        "old_delivery_date_begin": "2026-04-14T00:00:00Z",
        "old_delivery_date_end": "2026-04-15T00:00:00Z",
        "received_at": received_at,
    }


def card_edit(at: str, offer: str = "A-7") -> dict[str, Any]:
    return {
        "message_type": "TYPE_CREATE_OR_UPDATE_ITEM",
        "offer_id": offer,
        "product_id": 77,
        "is_error": False,
        "changed_at": at,
        "seller_id": 9,
    }


def inputs(**changes: Any) -> ScoreInputs:
    """A posting handed over, scanned, re-priced, its card edited and its promise moved."""
    held = {
        "posting": posting(),
        "pushes": [
            {
                "message_type": "TYPE_NEW_POSTING",
                "posting_number": "48213907-0114-1",
                "products": [{"sku": 7, "quantity": 1}],
                "in_process_at": "2026-04-10T08:15:00Z",
            },
            state("posting_transferring_to_delivery", "2026-04-11T09:00:00Z"),
            card_edit("2026-04-11T15:00:00Z"),
            date_change("2026-04-12T10:00:00Z", "2026-04-16T00:00:00Z", "2026-04-17T00:00:00Z"),
            state("posting_in_carriage", "2026-04-13T06:00:00Z"),
            card_edit("2026-04-13T07:00:00Z"),
        ],
        "prices": [
            {"offer_id": "A-7", "at": "2026-03-01T00:00:00Z", "price": "1100"},
            {"offer_id": "A-7", "at": "2026-04-01T00:00:00Z", "price": "1000"},
            {"offer_id": "A-7", "at": "2026-04-12T00:00:00Z", "price": 900, "currency_code": "RUB"},
            {"offer_id": "A-7", "at": "2026-04-13T08:00:00Z", "price": 800},
            {"offer_id": "B-1", "at": "2026-04-12T00:00:00Z", "price": 5},
        ],
        "tracking": [
            {
                "posting_number": "48213907-0114-1",
                "at": "2026-04-11T10:00:00Z",
                "status": "принят",
                "location": "Москва",
            },
            {"posting_number": "48213907-0114-1", "at": "2026-04-13T05:00:00Z", "status": "в пути"},
        ],
    }
    held.update(changes)
    return ScoreInputs(**held)


AS_OF = ns("2026-04-12T12:00:00Z")
RISK = [
    (ns("2026-04-10T08:20:00Z"), 0.08, "low"),
    (ns("2026-04-11T09:05:00Z"), 0.35, "medium"),
    (ns("2026-04-12T00:05:00Z"), 0.72, "high"),
    (ns("2026-04-13T06:05:00Z"), 0.9, "high"),  # after as_of: not drawn
]


def render(timeline: Timeline, risk=RISK, labels=ZH, as_of: int = AS_OF) -> str:
    return render_timeline_svg(
        timeline, risk, as_of_ns=as_of, thresholds=(0.3, 0.6), labels=labels, title="订单时间线"
    )


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def with_class(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root.iter() if name in (e.get("class") or "").split()]


def shape(marker: ET.Element) -> tuple[Any, ...]:
    """A marker's drawn shape: its element and its size or number of corners."""
    (drawn, *_) = [child for child in marker if child.tag != f"{SVG}title"]
    tag = drawn.tag.removeprefix(SVG)
    if tag == "rect":
        return (tag, drawn.get("width"), drawn.get("height"))
    if tag == "polygon":
        return (tag, len(drawn.get("points").split()))
    return (tag,)


# --- building -------------------------------------------------------------------------------------


def test_nothing_known_after_as_of_is_kept() -> None:
    timeline = build_timeline(inputs(), AS_OF)
    assert all(event.at <= AS_OF for event in timeline.events)
    assert [(e.lane, e.code) for e in timeline.events] == [
        ("price", "price"),  # the price in force at the order (set before it)
        ("status", "posting_created"),
        ("status", "posting_transferring_to_delivery"),
        ("scan", "принят"),
        ("card", "card"),
        ("price", "price"),
        ("promise", "promise"),
    ]
    later = build_timeline(inputs(), ns("2026-04-14T00:00:00Z"))
    added = [event for event in later.events if event not in timeline.events]
    assert [(e.at, e.lane, e.code) for e in added] == [
        (ns("2026-04-13T05:00:00Z"), "scan", "в пути"),
        (ns("2026-04-13T06:00:00Z"), "status", "posting_in_carriage"),
        (ns("2026-04-13T07:00:00Z"), "card", "card"),
        (ns("2026-04-13T08:00:00Z"), "price", "price"),
    ]
    assert len(later.events) == len(timeline.events) + len(added)


def test_the_hand_over_is_shown_only_once_it_happened() -> None:
    handed = inputs(posting=posting(delivering_date="2026-04-11T09:00:00Z"))
    assert build_timeline(handed, ns("2026-04-11T08:59:00Z")).handed_over_at is None
    assert build_timeline(handed, AS_OF).handed_over_at == ns("2026-04-11T09:00:00Z")


def test_a_price_change_after_purchase_shows_its_change_against_the_price_paid() -> None:
    timeline = build_timeline(inputs(), AS_OF)
    assert timeline.paid_unit_prices == {"A-7": 1000.0}
    assert timeline.currency == "RUB"
    prices = [e for e in timeline.events if e.lane == "price"]
    # The row of March is no longer in force at the order; offer B-1 is not in this posting.
    assert [(e.at, e.detail["price"], e.detail["offer_id"]) for e in prices] == [
        (ns("2026-04-01T00:00:00Z"), 1000.0, "A-7"),
        (ns("2026-04-12T00:00:00Z"), 900.0, "A-7"),
    ]
    at_order, cheaper = prices
    assert at_order.detail["at_order"] is True and at_order.detail["pct_vs_paid"] == 0.0
    assert cheaper.detail["at_order"] is False
    assert cheaper.detail["pct_vs_paid"] == -10.0
    assert cheaper.detail["paid"] == 1000.0 and cheaper.detail["previous_price"] == 1000.0
    rows = timeline_rows(timeline, RU)
    assert {"at": "2026-04-12 00:00 UTC", "lane": "price", "lane_label": "Цена"}.items() <= (
        rows[5].items()
    )
    assert rows[5]["text"] == "A-7: 900.00 RUB (-10.0% vs paid)"


def test_a_price_in_another_currency_is_not_compared_with_the_price_paid() -> None:
    prices = [
        {"offer_id": "A-7", "at": "2026-04-12T00:00:00Z", "price": 80, "currency_code": "CNY"}
    ]
    (event,) = [e for e in build_timeline(inputs(prices=prices), AS_OF).events if e.lane == "price"]
    assert event.detail["pct_vs_paid"] is None and event.detail["currency_code"] == "CNY"


def test_a_delivery_date_change_moves_the_promised_window() -> None:
    before = build_timeline(inputs(), ns("2026-04-12T09:00:00Z"))
    after = build_timeline(inputs(), AS_OF)
    assert (before.promised_begin, before.promised_end) == (
        ns("2026-04-14T00:00:00Z"),
        ns("2026-04-15T00:00:00Z"),
    )
    assert (after.promised_begin, after.promised_end) == (
        ns("2026-04-16T00:00:00Z"),
        ns("2026-04-17T00:00:00Z"),
    )
    # The book's posting object may already carry the new promise: before the change is
    # known, the promise in force is the change's old one (as the features read it).
    moved = posting(analytics_data={"delivery_date_begin": "2026-04-16T00:00:00Z"})
    early = build_timeline(inputs(posting=moved), ns("2026-04-12T09:00:00Z"))
    assert early.promised_begin == ns("2026-04-14T00:00:00Z")
    (change,) = [e for e in after.events if e.lane == "promise"]
    assert change.detail["begin"] == ns("2026-04-16T00:00:00Z")
    assert change.detail["old_end"] == ns("2026-04-15T00:00:00Z")

    def window_x(timeline: Timeline) -> float:
        root = parse(render(timeline, as_of=ns("2026-04-12T12:00:00Z")))
        (group,) = with_class(root, "promise-window")
        return float(group.find(f"{SVG}rect").get("x"))

    assert window_x(after) > window_x(before)


def test_a_cancellation_is_a_status_event_with_its_reason() -> None:
    cancelled = {
        "message_type": "TYPE_POSTING_CANCELLED",
        "posting_number": "48213907-0114-1",
        "products": [{"sku": 7, "quantity": 1}],
        "old_state": "posting_transferring_to_delivery",
        "new_state": "posting_canceled",
        "changed_state_date": "2026-04-12T11:00:00Z",
        "reason": {"id": 352, "message": "Покупатель передумал"},
    }
    timeline = build_timeline(inputs(pushes=[cancelled]), AS_OF)
    (event,) = [e for e in timeline.events if e.lane == "status"]
    assert event.code == "posting_canceled" and event.detail["reason_id"] == 352
    assert timeline_rows(timeline, {})[-1]["text"] == "posting_canceled: Покупатель передумал (352)"
    root = parse(render(timeline))
    (marker,) = with_class(root, "event-cancellation")
    assert "event-status" in marker.get("class").split()


def test_unreadable_records_are_counted_not_raised() -> None:
    broken = inputs(
        prices=[{"offer_id": "A-7", "at": "soon", "price": 1}, "not a row"],
        pushes=[{"message_type": "TYPE_STATE_CHANGED", "posting_number": "48213907-0114-1"}],
    )
    timeline = build_timeline(broken, AS_OF)
    assert timeline.rejected == 3
    assert [e.lane for e in timeline.events] == ["scan"]  # the tracking rows are fine
    render(timeline)  # still draws


def test_the_order_of_the_records_does_not_change_the_timeline() -> None:
    held = inputs()
    shuffled = inputs(
        pushes=list(reversed(held.pushes)),
        prices=list(reversed(held.prices)),
        tracking=list(reversed(held.tracking)),
    )
    assert build_timeline(shuffled, AS_OF).events == build_timeline(held, AS_OF).events


# --- drawing --------------------------------------------------------------------------------------


def test_the_svg_is_accessible_xml_with_a_titled_marker_per_event() -> None:
    timeline = build_timeline(inputs(), AS_OF)
    svg = render(timeline)
    root = parse(svg)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    assert root.get("width") == "100%" and root.get("viewBox", "").startswith("0 0 ")
    ids = {e.get("id"): e for e in root.iter() if e.get("id")}
    title_id, desc_id = root.get("aria-labelledby").split()
    assert ids[title_id].tag == f"{SVG}title" and ids[title_id].text == "订单时间线"
    assert ids[desc_id].tag == f"{SVG}desc"
    assert ids[desc_id].text == "订单时间线: 7 个事件; 风险 8% → 72%"

    markers = with_class(root, "event")
    assert len(markers) == len(timeline.events) == 7
    for marker, event in zip(markers, timeline.events, strict=True):
        assert f"event-{event.lane}" in marker.get("class").split()
        title = marker.find(f"{SVG}title")
        assert title is not None and title.text.startswith(marker.get("data-at"))
    assert len(with_class(root, "event-scan")) == 1
    scan_title = with_class(root, "event-scan")[0].find(f"{SVG}title").text
    assert scan_title == "2026-04-11 10:00 UTC — 物流扫描: принят · Москва"
    # Each lane has its own shape, not only its own colour (the price drop: a triangle down).
    shapes = {lane: shape(with_class(root, f"event-{lane}")[-1]) for lane in LANES}
    assert shapes == {
        "status": ("circle",),
        "scan": ("rect", "9", "9"),
        "price": ("polygon", 3),
        "card": ("polygon", 12),
        "promise": ("polygon", 4),
    }
    assert "script" not in svg.lower() and "href" not in svg


def test_the_risk_history_is_a_step_line_with_a_point_per_score_up_to_now() -> None:
    root = parse(render(build_timeline(inputs(), AS_OF)))
    points = with_class(root, "risk-point")
    assert [p.get("class") for p in points] == [
        "risk-point risk-low",
        "risk-point risk-medium",
        "risk-point risk-high",
    ]  # the score after as_of is left out
    assert all(p.find(f"{SVG}title") is not None for p in points)
    assert points[1].find(f"{SVG}title").text == "2026-04-11 09:05 UTC — 风险: 35% (medium)"
    (line,) = with_class(root, "risk-line")
    vertices = [tuple(map(float, v.split(","))) for v in line.get("points").split()]
    # One vertex per score, one per step between scores, and the last held until now.
    assert len(vertices) == 2 * 3 - 1 + 1
    circles = [p.find(f"{SVG}circle") for p in points]
    centres = [(float(c.get("cx")), float(c.get("cy"))) for c in circles]
    assert [vertices[0], vertices[2], vertices[4]] == centres
    assert vertices[1][1] == vertices[0][1] and vertices[1][0] == vertices[2][0]
    (now,) = with_class(root, "now-line")
    assert float(now.find(f"{SVG}line").get("x1")) == vertices[-1][0]
    assert {g.get("class") for g in with_class(root, "threshold")} == {
        "threshold threshold-medium",
        "threshold threshold-high",
    }


def test_the_page_language_labels_the_chart() -> None:
    svg = render(build_timeline(inputs(), AS_OF))
    root = parse(svg)
    lane_names = [t.text for t in with_class(root, "lane-label")]
    assert lane_names == [ZH[lane] for lane in LANES]
    assert with_class(root, "now-label")[0].text == "现在"
    assert with_class(root, "risk-label")[0].text == "风险"
    assert with_class(root, "promise-label")[0].text == "承诺送达"
    for word in DEFAULT_LABELS["status"], "Carrier scans", "promised delivery", ">now<":
        assert word not in svg
    assert [t.text for t in with_class(root, "tick-label")] == [
        "11 Apr",
        "13 Apr",
        "15 Apr",
        "17 Apr",
    ]
    months = "1月 2月 3月 4月 5月 6月 7月 8月 9月 10月 11月 12月"
    chinese = render(build_timeline(inputs(), AS_OF), labels={**ZH, "months": months})
    ticks = [t.text for t in with_class(parse(chinese), "tick-label")]
    assert ticks == ["11 4月", "13 4月", "15 4月", "17 4月"]


def test_text_is_escaped() -> None:
    scans = [
        {
            "posting_number": "48213907-0114-1",
            "at": "2026-04-11T10:00:00Z",
            "status": '<script>alert("x")</script>',
            "location": "A & B",
        }
    ]
    svg = render_timeline_svg(
        build_timeline(inputs(tracking=scans), AS_OF),
        RISK,
        as_of_ns=AS_OF,
        thresholds=None,
        labels={"scan": "<b>scans</b>"},
        title='Order "1" <2>',
    )
    assert "<script" not in svg and "<b>" not in svg
    root = parse(svg)
    (scan,) = with_class(root, "event-scan")
    assert scan.find(f"{SVG}title").text.endswith('<script>alert("x")</script> · A & B')
    assert root.find(f"{SVG}title").text == 'Order "1" <2>'
    assert not with_class(root, "threshold")


def test_the_same_records_draw_the_same_bytes() -> None:
    first = render(build_timeline(inputs(), AS_OF))
    again = render(build_timeline(inputs(), AS_OF), risk=list(reversed(RISK)))
    assert first == again


def test_an_empty_history_still_draws() -> None:
    bare = ScoreInputs(posting(analytics_data=None, shipment_date=None))
    timeline = build_timeline(bare, AS_OF)
    assert timeline.events == () and timeline.promised_begin is None
    svg = render(timeline, risk=[])
    root = parse(svg)
    assert not with_class(root, "event") and not with_class(root, "risk-point")
    assert not with_class(root, "risk-line") and not with_class(root, "promise-window")
    assert with_class(root, "now-line") and with_class(root, "tick-label")
    assert root.find(f"{SVG}desc").text == "订单时间线: 0 个事件"
    assert timeline_rows(timeline, ZH) == []


def test_a_posting_that_cannot_be_read_still_draws() -> None:
    unreadable = ScoreInputs({"posting_number": "X-1", "products": []})
    timeline = build_timeline(unreadable, AS_OF)
    assert timeline.posting_number == "X-1" and timeline.ordered_at is None
    assert timeline.rejected == 1
    parse(render(timeline, risk=[(AS_OF, 0.5, "medium")]))
