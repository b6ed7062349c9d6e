"""The seller-cabinet CSV export: both header generations, dates, decimals, statuses."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from core.errors import HistoryError
from core.ingest import load_history
from core.tables import HistoryTables

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


@pytest.fixture(scope="module")
def newer() -> HistoryTables:
    return load_history(FIXTURES / "cabinet_new")


@pytest.fixture(scope="module")
def older() -> HistoryTables:
    return load_history(FIXTURES / "cabinet_old")


def posting(tables: HistoryTables, number: str) -> pd.Series:
    return tables.postings.set_index("posting_number").loc[number]


def test_fixture_files_are_what_the_cabinet_writes() -> None:
    raw = (FIXTURES / "cabinet_new" / "orders.csv").read_bytes()
    assert raw.startswith(b'\xef\xbb\xbf"')  # BOM, then a quoted header
    assert b'";"' in raw.splitlines()[0]
    assert b"\r\n" in (FIXTURES / "cabinet_old" / "orders.csv").read_bytes()


def test_rows_group_into_postings_even_when_not_adjacent(newer: HistoryTables) -> None:
    items = newer.items[newer.items["posting_number"] == "0150000001-0001-1"]
    assert items["line_no"].tolist() == [0, 1]
    assert items["offer_id"].tolist() == ["PIN-205953", "BAT-AA"]
    assert posting(newer, "0150000001-0001-1")["source_line"] == 2  # its first row


def test_newer_header_dates_are_moscow_time_in_utc(newer: HistoryTables) -> None:
    row = posting(newer, "0150000001-0001-1")
    assert row["ordered_at"] == pd.Timestamp("2026-04-14T16:01:23Z")  # 19:01:23 MSK
    assert row["shipment_deadline_at"] == pd.Timestamp("2026-04-15T15:00:00Z")
    assert row["handed_over_at"] == pd.Timestamp("2026-04-15T07:00:00Z")
    assert row["delivered_at"] == pd.Timestamp("2026-04-18T09:00:00Z")
    assert row["status"] == "delivered"
    assert row["scheme"] == "cabinet_csv"
    assert row["region"] == "Московская область"
    assert row["carrier_name"] == "Ozon Логистика"


def test_older_header_and_cabinet_date_format(older: HistoryTables) -> None:
    row = posting(older, "0250000001-0001-1")
    assert row["ordered_at"] == pd.Timestamp("2026-04-14T16:01:00Z")  # 14.04.2026 19:01 MSK
    assert row["delivered_at"] == pd.Timestamp("2026-04-18T09:00:00Z")
    assert row["delivery_method_name"] == "Ozon Логистика курьеру, Москва"
    assert row["payment_type"] == "Карта онлайн"
    late = posting(older, "0250000003-0001-1")
    assert late["ordered_at"] == pd.Timestamp("2026-04-16T20:30:00Z")
    assert late["status"] == "awaiting_packaging"  # «Ожидает сборки»
    items = older.items.set_index("posting_number")
    assert items.loc["0250000001-0001-1", "sku"] == 358924380  # «OZON id»
    assert items.loc["0250000001-0001-1", "name"] == "Электронный конструктор PinLab"
    assert items.loc["0250000003-0001-1", "unit_price"] == 120.5  # «Итоговая стоимость товара»
    assert items.loc["0250000003-0001-1", "quantity"] == 4


def test_comma_decimals_and_thousand_spaces(newer: HistoryTables) -> None:
    items = newer.items.set_index(["posting_number", "line_no"])
    first = items.loc[("0150000001-0001-1", 0)]
    assert first["unit_price"] == 1390.0  # "1 390,00"
    assert first["old_price"] == 1790.0
    assert first["discount_pct"] == pytest.approx(22.35)
    assert bool(first["has_promotion"]) is True
    assert items.loc[("0150000001-0001-1", 1), "unit_price"] == 250.5
    chinese = items.loc[("0150000003-0001-1", 0)]
    assert chinese["name"] == "蓝牙耳机 无线" and chinese["unit_price"] == pytest.approx(89.9)


def test_cancellation_time_from_the_cancel_date_column(newer: HistoryTables) -> None:
    row = posting(newer, "0150000002-0001-1")
    assert row["status"] == "cancelled"
    assert row["cancelled_at"] == pd.Timestamp("2026-04-15T05:30:00Z")
    assert row["cancelled_by"] == "unknown"  # the export names no initiator


def test_cancellations_count_as_buyer_only_when_the_seller_says_so() -> None:
    tables = load_history(FIXTURES / "cabinet_new", csv_cancellations_are_buyer=True)
    assert posting(tables, "0150000002-0001-1")["cancelled_by"] == "buyer"
    assert pd.isna(posting(tables, "0150000001-0001-1")["cancelled_by"])  # delivered


def test_older_export_cancellation_has_no_time(older: HistoryTables) -> None:
    row = posting(older, "0250000002-0001-1")
    assert row["cancelled_by"] == "unknown" and pd.isna(row["cancelled_at"])


def test_unknown_status_text_is_kept_and_warned(newer: HistoryTables) -> None:
    assert posting(newer, "0150000005-0001-1")["status"] == "Ожидает чуда"
    assert any("'Ожидает чуда' (1)" in warning for warning in newer.report.warnings)


def test_csv_rejects(newer: HistoryTables) -> None:
    assert newer.rejects.to_dict("records") == [
        {"file": "orders.csv", "line": 8, "reason": "no posting_number"},
        {"file": "orders.csv", "line": 9, "reason": "price 'abc' of product 2 is not a number"},
        {
            "file": "orders.csv",
            "line": 11,
            "reason": "«Принят в обработку» 'когда-нибудь' is not a date",
        },
    ]
    report = newer.report
    assert (report.postings_read, report.postings_kept, report.postings_rejected) == (8, 5, 3)
    assert not newer.items["posting_number"].eq("0150000006-0001-1").any()


def test_missing_required_column_stops_with_its_name(tmp_path: Path) -> None:
    header = "Номер заказа;Принят в обработку;Статус;Количество;Ваша цена"
    (tmp_path / "orders.csv").write_text(
        header + "\n1;2026-04-14 19:01:23;Доставлен;1;10\n", encoding="utf-8-sig"
    )
    with pytest.raises(
        HistoryError, match=re.escape("orders.csv: required column «Номер отправления»")
    ):
        load_history(tmp_path)


def test_missing_price_column_names_both_generations(tmp_path: Path) -> None:
    header = "Номер отправления;Принят в обработку;Статус;Количество"
    (tmp_path / "orders.csv").write_text(header + "\n", encoding="utf-8")
    with pytest.raises(HistoryError, match=re.escape("«Ваша цена» or «Итоговая стоимость товара»")):
        load_history(tmp_path)


@pytest.mark.parametrize("broken_first", [True, False])
def test_a_row_with_extra_fields_rejects_its_posting_not_the_file(
    tmp_path: Path, broken_first: bool
) -> None:
    """An unquoted separator shifts every later value of the row: never guess, reject it."""
    header = "Номер отправления;Принят в обработку;Статус;Количество;Ваша цена"
    good = ["A-1;2026-04-14 19:01:23;Доставлен;1;10", "C-1;2026-04-14 19:01:23;Доставлен;1;12"]
    broken = ["B-1;2026-04-14 19:01:23;Доставлен;1;Ручка; синяя;12", "B-1;2026-04-14;Доставлен;1;5"]
    rows = [*broken, *good] if broken_first else [*good, *broken]
    (tmp_path / "orders.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    tables = load_history(tmp_path)
    assert set(tables.postings["posting_number"]) == {"A-1", "C-1"}
    assert not tables.items["posting_number"].eq("B-1").any()
    assert tables.rejects.to_dict("records") == [
        {
            "file": "orders.csv",
            "line": 2 if broken_first else 4,
            "reason": "row has 7 fields, the header has 5",
        }
    ]
