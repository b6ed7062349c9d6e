"""Pushes, the price log, carrier scans and product cards -> events and products."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from core.errors import HistoryError
from core.ingest import load_history
from core.ingest.events import build_price_events, build_push_events
from core.tables import EVENT_COLUMNS, EVENT_KINDS, HistoryTables

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


@pytest.fixture(scope="module")
def shop() -> HistoryTables:
    return load_history(FIXTURES / "shop")


def events_from(tables: HistoryTables, file: str) -> pd.DataFrame:
    return tables.events[tables.events["source_file"] == file]


def test_events_have_the_canonical_columns_and_known_kinds(shop: HistoryTables) -> None:
    assert list(shop.events.columns) == list(EVENT_COLUMNS)
    assert {str(c): str(t) for c, t in shop.events.dtypes.items()} == EVENT_COLUMNS
    assert set(shop.events["kind"]) <= set(EVENT_KINDS)
    assert shop.events["at"].is_monotonic_increasing


def test_each_used_push_type_becomes_its_event(shop: HistoryTables) -> None:
    pushes = events_from(shop, "pushes.jsonl").set_index("source_line")
    new = pushes.loc[1]
    assert (new["kind"], new["state"], new["posting_number"]) == (
        "state_change",
        "posting_created",
        "1001-0001-1",
    )
    assert new["at"] == pd.Timestamp("2026-04-10T08:15:00Z")
    assert pushes.loc[2, "state"] == "posting_transferring_to_delivery"
    cancel = pushes.loc[3]
    assert cancel["kind"] == "cancellation"
    assert cancel["reason_id"] == 401 and cancel["reason"] == "买家取消"
    assert cancel["at"] == pd.Timestamp("2026-04-11T06:30:00.5Z")
    moved = pushes.loc[7]
    assert moved["kind"] == "delivery_date_change"
    assert moved["at"] == pd.Timestamp("2026-04-12T07:00:00Z")  # received_at
    assert moved["delivery_begin_at"] == pd.Timestamp("2026-04-16T09:00:00Z")
    assert moved["old_delivery_end_at"] == pd.Timestamp("2026-04-14T18:00:00Z")
    edit = pushes.loc[8]
    assert (edit["kind"], edit["offer_id"], edit["sku"]) == ("card_edit", "PIN-205953", 358924380)
    assert edit["at"] == pd.Timestamp("2026-04-11T12:00:00Z")


def test_unused_push_types_are_counted_not_rejected(shop: HistoryTables) -> None:
    assert (
        "skipped 3 pushes of unused types: TYPE_NEW_MESSAGE (1), TYPE_PING (1), "
        "TYPE_STOCKS_CHANGED (1)"
    ) in shop.report.warnings
    assert any("is_error=true" in w for w in shop.report.warnings)
    pushes = events_from(shop, "pushes.jsonl")
    assert 9 not in pushes["source_line"].tolist()  # the failed card update
    assert (
        not shop.rejects["line"][shop.rejects["file"] == "pushes.jsonl"].isin([9, 10, 11, 12]).any()
    )


def test_push_rejects(shop: HistoryTables) -> None:
    rejects = shop.rejects[shop.rejects["file"] == "pushes.jsonl"]
    assert rejects[["line", "reason"]].to_dict("records") == [
        {"line": 14, "reason": "TYPE_STATE_CHANGED push: no changed_state_date"},
        {"line": 16, "reason": "not valid JSON (unexpected control character in string)"},
        {
            "line": 17,
            "reason": "TYPE_DELIVERY_DATE_CHANGED push: "
            "no received_at, and no later timestamped push to date it by",
        },
        {"line": 18, "reason": "push: no message_type"},
    ]
    assert shop.report.files_read["pushes.jsonl"] == 17  # 18 lines, one blank


def test_push_builder_never_raises_on_odd_values() -> None:
    batch = build_push_events(
        [None, [], {"message_type": 5}, {"message_type": "TYPE_STATE_CHANGED", "new_state": 1}],
        [1, 2, 3, 4],
        "pushes.jsonl",
    )
    assert len(batch.frame) == 0
    assert batch.rejects["reason"].tolist() == [
        "push: not a JSON object",
        "push: not a JSON object",
        "push: no message_type",
        "TYPE_STATE_CHANGED push: no posting_number",
    ]


def test_price_log_with_comma_decimals_and_offsets(shop: HistoryTables) -> None:
    prices = events_from(shop, "prices.csv").set_index("source_line")
    assert prices.loc[2, "price"] == 1590.0 and prices.loc[2, "old_price"] == 1790.0  # "1590,00"
    assert prices.loc[3, "price"] == 1290.5
    assert prices.loc[3, "at"] == pd.Timestamp("2026-04-12T06:00:00Z")  # +03:00
    assert prices.loc[4, "currency_code"] == "CNY" and pd.isna(prices.loc[4, "old_price"])
    assert (prices["kind"] == "price").all()


def test_price_and_scan_rejects(shop: HistoryTables) -> None:
    rejects = shop.rejects[shop.rejects["file"].isin(["prices.csv", "tracking.csv"])]
    assert rejects.to_dict("records") == [
        {"file": "prices.csv", "line": 5, "reason": "price row: price 'abc' is not a number"},
        {"file": "prices.csv", "line": 6, "reason": "price row: no offer_id"},
        {
            "file": "prices.csv",
            "line": 7,
            "reason": "price row: at 'yesterday' is not a timestamp",
        },
        {
            "file": "tracking.csv",
            "line": 5,
            "reason": "scan row: at 'not-a-date' is not a timestamp",
        },
    ]


def test_price_rows_from_values_of_any_type() -> None:
    parsed = build_price_events(
        {
            "offer_id": ["A", "B", "C", "D"],
            "at": ["2026-01-01T00:00:00Z"] * 4,
            "price": [100, "99,5", float("inf"), -1],
        },
        [1, 2, 3, 4],
        "request",
    )
    assert parsed.frame["price"].tolist() == [100.0, 99.5]
    assert parsed.rejects["reason"].tolist() == [
        "price row: price 'inf' is negative or not finite",
        "price row: price '-1' is negative or not finite",
    ]


def test_scans_in_any_language_and_without_status(shop: HistoryTables) -> None:
    scans = events_from(shop, "tracking.csv").set_index("source_line")
    assert scans.loc[2, "state"] == "Принят в сортировочном центре"
    assert (scans.loc[3, "state"], scans.loc[3, "location"]) == ("已揽收", "深圳")
    assert scans.loc[3, "at"] == pd.Timestamp("2026-04-10T21:00:00Z")  # +08:00
    assert pd.isna(scans.loc[4, "state"])


def test_product_cards(shop: HistoryTables) -> None:
    products = shop.products.set_index("offer_id")
    assert set(products.index) == {"PIN-205953", "EAR-BT5"}
    assert products.loc["PIN-205953", "description_category_id"] == 17028922
    assert products.loc["PIN-205953", "created_at"] == pd.Timestamp("2025-11-01T10:00:00Z")
    assert products.loc["EAR-BT5", "name"] == "蓝牙耳机 无线"
    rejects = shop.rejects[shop.rejects["file"] == "products.jsonl"]
    assert rejects[["line", "reason"]].to_dict("records") == [
        {"line": 3, "reason": "product card: no offer_id"}
    ]


@pytest.mark.parametrize(
    ("file", "header", "column"),
    [
        ("prices.csv", "offer_id,at,old_price", "price"),
        ("tracking.csv", "posting_number,status,location", "at"),
    ],
)
def test_side_file_without_a_required_column_stops(
    tmp_path: Path, file: str, header: str, column: str
) -> None:
    (tmp_path / "postings.jsonl").write_text("", encoding="utf-8")
    (tmp_path / file).write_text(header + "\n", encoding="utf-8")
    with pytest.raises(
        HistoryError, match=re.escape(f"{file}: required column '{column}' is missing")
    ):
        load_history(tmp_path)


def test_short_side_rows_are_rejected_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "postings.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "tracking.csv").write_text(
        "posting_number;at;status;location\nP-1;2026-04-11T09:30:00Z;scan;Москва\nP-2\n",
        encoding="utf-8",
    )
    tables = load_history(tmp_path)
    assert tables.events["posting_number"].tolist() == ["P-1"]
    assert tables.rejects[["line", "reason"]].to_dict("records") == [
        {"line": 3, "reason": "scan row: row has 1 field, the header has 4"}
    ]


def test_an_untimed_delivery_date_push_takes_the_time_of_the_next_timestamped_push() -> None:
    """Ozon's delivery-date push has no time: it is dated by the archive's arrival order."""
    change = {
        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
        "posting_number": "1-1-1",
        "new_delivery_date_begin": "2026-04-16T09:00:00Z",
        "new_delivery_date_end": "2026-04-16T18:00:00Z",
    }
    later = {
        "message_type": "TYPE_STATE_CHANGED",
        "posting_number": "2-2-2",
        "new_state": "posting_in_carriage",
        "changed_state_date": "2026-04-12T10:00:00Z",
    }
    skipped = {"message_type": "TYPE_CHAT_NEW_MESSAGE", "created_at": "2026-04-12T09:00:00Z"}
    batch = build_push_events([change, {"no": "time"}, skipped, later], [1, 2, 3, 4], "p.jsonl")
    moved = batch.frame[batch.frame["kind"] == "delivery_date_change"].iloc[0]
    # The chat message is the nearest later push with a time: known by then at the latest.
    assert moved["at"] == pd.Timestamp("2026-04-12T09:00:00Z")
    assert batch.rejects["line"].tolist() == [2]
