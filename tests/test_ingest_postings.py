"""Seller API postings: every reply shape, the posting fields, cancellations and rejects."""

from __future__ import annotations

from pathlib import Path

import orjson
import pandas as pd
import pytest

from core.ingest import load_history
from core.ingest.history import build_reply_postings
from core.tables import HistoryTables

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


@pytest.fixture(scope="module")
def shop() -> HistoryTables:
    return load_history(FIXTURES / "shop")


@pytest.fixture(scope="module")
def pages() -> HistoryTables:
    return load_history(FIXTURES / "pages")


def posting(tables: HistoryTables, number: str) -> pd.Series:
    rows = tables.postings[tables.postings["posting_number"] == number]
    assert len(rows) == 1, f"{number} appears {len(rows)} times"
    return rows.iloc[0]


def test_ozon_example_replies_load_as_published() -> None:
    """The Seller API's own example responses (v3 list, v3 get, FBO v2 list)."""
    tables = load_history(FIXTURES / "api_examples")
    by_number = tables.postings.set_index("posting_number")
    assert set(by_number.index) == {"05708065-0029-1", "57195475-0050-3", "16965409-0014-1"}
    listed = by_number.loc["05708065-0029-1"]
    assert listed["status"] == "awaiting_deliver"
    assert listed["scheme"] == "fbs"
    assert listed["carrier_id"] == 24
    assert listed["delivery_method_id"] == 21321684811000
    assert listed["ordered_at"] == pd.Timestamp("2022-05-13T07:07:32Z")
    assert pd.isna(listed["tracking_number"])  # "" in the reply
    assert pd.isna(listed["cancelled_by"])  # empty cancellation object: not cancelled
    assert by_number.loc["57195475-0050-3", "ordered_at"] == pd.Timestamp("2021-11-20T09:14:16Z")
    fbo = by_number.loc["16965409-0014-1"]
    assert fbo["scheme"] == "fbo"
    assert fbo["status"] == "delivered"
    assert fbo["delivery_type"] == "PVZ"
    assert fbo["ordered_at"] == pd.Timestamp("2021-09-01T00:25:30.120Z")
    items = tables.items.set_index("posting_number")
    assert items.loc["05708065-0029-1", "unit_price"] == 1390.0  # "1390.000000"
    assert items.loc["57195475-0050-3", "unit_price"] == 279.0  # "279.0000"
    assert items.loc["16965409-0014-1", "old_price"] == 115.0  # from financial_data
    assert bool(items.loc["16965409-0014-1", "has_promotion"]) is True
    assert tables.report.postings_rejected == 0


@pytest.mark.parametrize(
    ("file", "numbers"),
    [
        ("postings_a_v3.json", {"3001-0001-1", "3001-0002-1"}),
        ("postings_b_v4.json", {"4001-0001-1"}),
        ("postings_c_v4_wrapped.json", {"4002-0001-1"}),
        ("postings_d_array.json", {"5001-0001-1"}),
        ("postings_e_get.json", {"6001-0001-1"}),
        ("postings_f_fbo.json", {"7001-0001-1"}),
    ],
)
def test_every_reply_shape_yields_its_postings(
    pages: HistoryTables, file: str, numbers: set[str]
) -> None:
    from_file = pages.postings[pages.postings["source_file"] == file]
    assert set(from_file["posting_number"]) == numbers


def test_reply_rejects_name_the_posting_index(pages: HistoryTables) -> None:
    assert pages.rejects.to_dict("records") == [
        {"file": "postings_b_v4.json", "line": 2, "reason": "posting #2: no posting_number"}
    ]
    assert pages.report.postings_read == 8
    assert pages.report.files_read["postings_b_v4.json"] == 2


def test_fbo_postings_fall_back_to_created_at_and_top_level_reason(pages: HistoryTables) -> None:
    fbo = posting(pages, "7001-0001-1")
    assert fbo["scheme"] == "fbo"
    assert fbo["ordered_at"] == pd.Timestamp("2026-03-06T10:00:00.5Z")
    assert fbo["cancel_reason_id"] == 352
    assert fbo["cancelled_by"] == "unknown"
    assert fbo["warehouse_id"] == 17717042026000


def test_reply_shape_detection_reports_unknown_documents() -> None:
    assert build_reply_postings({"result": {"postings": [1]}}) == ([1], None)
    assert build_reply_postings({"result": [1]}) == ([1], "fbo")
    assert build_reply_postings([1, 2]) == ([1, 2], None)
    reason = build_reply_postings({"error": "rate limited", "code": 429})
    assert reason == "reply holds no postings (top-level keys: code, error)"


def test_posting_fields_read_from_nested_objects(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0001-1")
    assert row["order_id"] == 5001
    assert row["carrier_id"] == 24 and row["carrier_name"] == "Ozon Логистика"
    assert row["warehouse_id"] == 21321684811000
    assert row["region"] == "Московская область"
    assert row["payment_type"] == "Карты оплаты"
    assert bool(row["is_premium"]) is True and bool(row["is_legal"]) is False
    assert row["promised_delivery_begin_at"] == pd.Timestamp("2026-04-14T09:00:00Z")
    assert row["shipment_deadline_at"] == pd.Timestamp("2026-04-11T10:00:00Z")


def test_null_sub_objects_and_offsets(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0007-1")  # analytics, financial, customer, cancellation all null
    assert pd.isna(row["region"]) and pd.isna(row["customer_id"]) and pd.isna(row["is_premium"])
    assert row["ordered_at"] == pd.Timestamp("2026-04-09T04:00:00.5Z")  # +03:00 with fraction
    assert row["handed_over_at"] == pd.Timestamp("2026-04-10T09:30:00Z")
    assert row["tracking_number"] == "TRK-0007"


def test_chinese_text_is_kept_and_prices_are_strings(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0002-1")
    assert row["delivery_method_name"] == "跨境物流 标准"
    assert row["carrier_id"] == 1107
    item = shop.items[shop.items["posting_number"] == "1001-0002-1"].iloc[0]
    assert item["name"] == "蓝牙耳机 无线"
    assert item["unit_price"] == pytest.approx(89.90)
    assert item["currency_code"] == "CNY"


def test_numbers_given_as_strings_and_unknown_status(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0015-1")
    assert row["status"] == "some_future_status"
    item = shop.items[shop.items["posting_number"] == "1001-0015-1"].iloc[0]
    assert item["sku"] == 700008 and item["quantity"] == 2 and item["unit_price"] == 45.0


def test_financial_data_gives_discounts_per_item(shop: HistoryTables) -> None:
    items = shop.items[shop.items["posting_number"] == "1001-0001-1"].set_index("line_no")
    assert items.loc[0, "old_price"] == 1790.0
    assert items.loc[0, "discount_pct"] == pytest.approx(22.35)
    assert bool(items.loc[0, "has_promotion"]) is True
    assert pd.isna(items.loc[1, "old_price"])  # old_price 0 means none
    assert bool(items.loc[1, "has_promotion"]) is False
    assert items.loc[1, "quantity"] == 2 and items.loc[1, "unit_price"] == 250.5


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("1001-0002-1", "buyer"),  # cancellation_type "client"
        ("1001-0003-1", "buyer"),  # cancellation_type "customer"
        ("1001-0004-1", "buyer"),  # no type, initiator "Покупатель"
        ("1001-0005-1", "seller"),  # type "seller", initiator "Продавец"
        ("1001-0014-1", "unknown"),  # status cancelled, empty cancellation object
        ("1001-0001-1", None),  # not cancelled
    ],
)
def test_cancelled_by(shop: HistoryTables, number: str, expected: str | None) -> None:
    value = posting(shop, number)["cancelled_by"]
    assert pd.isna(value) if expected is None else value == expected, value


def test_initiator_words_are_case_insensitive(pages: HistoryTables) -> None:
    assert posting(pages, "5001-0001-1")["cancelled_by"] == "buyer"  # "КЛИЕНТ"


def test_rejects_report_file_line_and_reason_and_keeps_the_rest(shop: HistoryTables) -> None:
    rejects = shop.rejects[shop.rejects["file"].str.startswith("postings")]
    assert rejects.to_dict("records") == [
        {
            "file": "postings_page1.json",
            "line": 2,
            "reason": "posting #2: price '-5.00' of product 1 is negative",
        },
        {
            "file": "postings_page1.json",
            "line": 3,
            "reason": "posting #3: in_process_at 'not a time' is not a timestamp",
        },
        {"file": "postings.jsonl", "line": 7, "reason": "not valid JSON (unexpected end of data)"},
        {"file": "postings.jsonl", "line": 8, "reason": "not a JSON object"},
        {"file": "postings.jsonl", "line": 9, "reason": "no posting_number"},
        {"file": "postings.jsonl", "line": 10, "reason": "no in_process_at"},
        {
            "file": "postings.jsonl",
            "line": 11,
            "reason": "price 'abc' of product 2 is not a number",
        },
        {"file": "postings.jsonl", "line": 12, "reason": "no products"},
        {
            "file": "postings.jsonl",
            "line": 14,
            "reason": "quantity '0' of product 1 is not a positive integer",
        },
    ]
    # The valid lines around the bad ones (5 before, 13 between, 15-19 after) are loaded.
    for number in ("1001-0005-1", "1001-0007-1", "1001-0009-1", "1001-0015-1"):
        posting(shop, number)
    assert not shop.items["posting_number"].isin(["1001-0011-1", "1001-0013-1"]).any()


def test_blank_lines_are_skipped_not_rejected(shop: HistoryTables) -> None:
    assert 6 not in shop.rejects.loc[shop.rejects["file"] == "postings.jsonl", "line"].tolist()
    assert shop.report.files_read["postings.jsonl"] == 18  # 19 lines, one blank


def test_a_reply_file_that_is_not_json_is_one_reject(tmp_path: Path) -> None:
    (tmp_path / "postings.jsonl").write_bytes(
        orjson.dumps(
            {
                "posting_number": "1-1-1",
                "in_process_at": "2026-01-01T00:00:00Z",
                "products": [{"price": "1", "quantity": 1}],
            }
        )
    )
    (tmp_path / "postings_broken.json").write_text('{"result": {"postings": [', encoding="utf-8")
    tables = load_history(tmp_path)
    assert tables.rejects.to_dict("records") == [
        {
            "file": "postings_broken.json",
            "line": 1,
            "reason": "file is not valid JSON (unexpected end of data)",
        }
    ]
    assert tables.report.postings_read == 2
    assert tables.report.postings_kept == 1
