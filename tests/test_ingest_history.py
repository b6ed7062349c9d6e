"""load_history: the directory as a whole — merging, closing, accounting and hard errors."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import orjson
import pandas as pd
import pytest

from core.errors import HistoryError
from core.ingest import load_history
from core.tables import (
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    POSTING_COLUMNS,
    PRODUCT_COLUMNS,
    REJECT_COLUMNS,
    HistoryTables,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


@pytest.fixture(scope="module")
def shop() -> HistoryTables:
    return load_history(FIXTURES / "shop")


def posting(tables: HistoryTables, number: str) -> pd.Series:
    rows = tables.postings[tables.postings["posting_number"] == number]
    assert len(rows) == 1
    return rows.iloc[0]


def dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {str(name): str(dtype) for name, dtype in frame.dtypes.items()}


@pytest.mark.parametrize(
    "directory", ["shop", "pages", "api_examples", "cabinet_new", "cabinet_old"]
)
def test_every_table_has_the_canonical_columns_and_dtypes(directory: str) -> None:
    tables = load_history(FIXTURES / directory)
    assert dtypes(tables.postings) == POSTING_COLUMNS
    assert dtypes(tables.items) == ITEM_COLUMNS
    assert dtypes(tables.events) == EVENT_COLUMNS
    assert dtypes(tables.products) == PRODUCT_COLUMNS
    assert dtypes(tables.rejects) == REJECT_COLUMNS
    assert tables.postings["posting_number"].is_unique
    assert set(tables.items["posting_number"]) == set(tables.postings["posting_number"])


def test_every_posting_record_is_kept_rejected_or_merged(shop: HistoryTables) -> None:
    report = shop.report
    assert (report.postings_read, report.postings_kept) == (21, 10)
    assert (report.postings_rejected, report.duplicates_merged) == (9, 2)
    assert report.postings_read == (
        report.postings_kept + report.postings_rejected + report.duplicates_merged
    )
    assert report.files_read == {
        "postings_page1.json": 3,
        "postings.jsonl": 18,
        "pushes.jsonl": 17,
        "prices.csv": 6,
        "tracking.csv": 4,
        "products.jsonl": 3,
    }
    assert report.missing_optional == []


def test_the_more_progressed_duplicate_wins_and_gaps_are_filled(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0008-1")  # awaiting_packaging in postings.jsonl, delivering in a page
    assert row["status"] == "delivering"
    assert row["source_file"] == "postings_page1.json"
    assert row["tracking_number"] == "TRK-0008"
    assert row["region"] == "Татарстан"  # null in the winner, filled from the other record
    items = shop.items[shop.items["posting_number"] == "1001-0008-1"]
    assert items["offer_id"].tolist() == ["NEW-OFFER"]  # items come from the winner only
    assert items["unit_price"].tolist() == [650.0]


def test_between_equals_the_later_record_wins(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0001-1")  # lines 1 and 16 of postings.jsonl, same status
    assert row["source_line"] == 16
    assert row["tracking_number"] == "TRK-0001"  # "" on line 1, set on line 16
    assert row["customer_id"] == 77001  # customer null on line 16, given on line 1
    assert row["region"] == "Московская область"
    assert len(shop.items[shop.items["posting_number"] == "1001-0001-1"]) == 2


def test_cancellation_time_comes_from_the_push(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0002-1")
    assert row["cancelled_by"] == "buyer"
    assert row["cancelled_at"] == pd.Timestamp("2026-04-11T06:30:00.5Z")
    assert pd.isna(posting(shop, "1001-0003-1")["cancelled_at"])  # cancelled, but no push


def test_delivery_time_is_the_first_delivered_or_received_push(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0007-1")  # delivering in its snapshot
    assert row["status"] == "delivered"
    assert row["delivered_at"] == pd.Timestamp("2026-04-12T15:07:46.765Z")
    assert pd.isna(row["cancelled_by"])


def test_a_later_cancel_push_closes_a_stale_snapshot(shop: HistoryTables) -> None:
    row = posting(shop, "1001-0009-1")  # awaiting_deliver in postings.jsonl
    assert row["status"] == "cancelled"
    assert row["cancelled_by"] == "unknown"
    assert row["cancelled_at"] == pd.Timestamp("2026-04-12T08:00:00Z")
    assert row["cancel_reason_id"] == 352
    assert row["cancel_reason"] == "Покупатель передумал"
    assert "2 postings were still open in their snapshot and closed by a later push" in (
        shop.report.warnings
    )


def test_files_outside_the_contract_are_ignored(shop: HistoryTables) -> None:
    assert (FIXTURES / "shop" / "truth.csv").exists()
    assert "truth.csv" not in shop.report.files_read
    assert not shop.rejects["file"].eq("truth.csv").any()


def test_missing_optional_files_are_listed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="core.ingest"):
        tables = load_history(FIXTURES / "pages")
    assert tables.report.missing_optional == [
        "pushes.jsonl",
        "prices.csv",
        "tracking.csv",
        "products.jsonl",
    ]
    assert "optional tracking.csv is missing" in caplog.text
    assert len(tables.events) == 0 and len(tables.products) == 0


def test_a_missing_directory_stops_with_its_name(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(
        HistoryError, match=re.escape(f"history directory {missing} does not exist")
    ):
        load_history(missing)


def test_a_directory_without_postings_stops(tmp_path: Path) -> None:
    (tmp_path / "pushes.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "prices.csv").write_text("offer_id,at,price\n", encoding="utf-8")
    with pytest.raises(HistoryError) as raised:
        load_history(tmp_path)
    message = str(raised.value)
    assert "no postings" in message
    assert "postings.jsonl" in message and "postings*.json" in message and "orders.csv" in message


def test_an_empty_orders_csv_stops(tmp_path: Path) -> None:
    (tmp_path / "orders.csv").write_bytes(b"")
    with pytest.raises(HistoryError, match=r"orders\.csv is empty"):
        load_history(tmp_path)


def test_api_records_win_over_the_cabinet_export_and_borrow_its_dates(tmp_path: Path) -> None:
    header = "Номер отправления;Принят в обработку;Статус;Дата отмены;Количество;Ваша цена"
    (tmp_path / "orders.csv").write_text(
        f"{header}\nX-1;2026-04-14 19:00:00;Отменён;2026-04-15 09:00:00;1;100\n",
        encoding="utf-8-sig",
    )
    api = {
        "posting_number": "X-1",
        "status": "cancelled",
        "in_process_at": "2026-04-14T16:00:00Z",
        "cancellation": {"cancellation_type": "client", "cancel_reason_id": 352},
        "delivery_method": {"id": 1, "tpl_provider_id": 24},
        "products": [{"price": "100.000000", "quantity": 1, "sku": 5, "offer_id": "O-5"}],
    }
    (tmp_path / "postings.jsonl").write_bytes(orjson.dumps(api) + b"\n")
    tables = load_history(tmp_path)
    row = posting(tables, "X-1")
    assert (row["source_file"], row["scheme"], row["cancelled_by"]) == (
        "postings.jsonl",
        "fbs",
        "buyer",
    )
    assert row["cancelled_at"] == pd.Timestamp("2026-04-15T06:00:00Z")  # from «Дата отмены»
    assert tables.report.duplicates_merged == 1
    assert tables.items["offer_id"].tolist() == ["O-5"]


def test_jsonl_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    line = orjson.dumps(
        {
            "posting_number": "B-1",
            "in_process_at": "2026-04-14T16:00:00Z",
            "products": [{"price": "1", "quantity": 1}],
        }
    )
    (tmp_path / "postings.jsonl").write_bytes(b"\xef\xbb\xbf" + line + b"\r\n\r\n" + line + b"\r\n")
    tables = load_history(tmp_path)
    assert tables.postings["posting_number"].tolist() == ["B-1"]
    assert (tables.report.postings_read, tables.report.duplicates_merged) == (2, 1)
    assert len(tables.rejects) == 0
