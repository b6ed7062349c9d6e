"""The book's archive: the contract's files, read back by the loader as the records put in."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from typer.testing import CliRunner

from cancel_risk.cli import app
from core.ingest import load_history
from core.ingest.events import with_receipt_times
from live import archive as archive_module
from live.archive import ArchiveError, archive_book, csv_cell, write_archive
from live.book import (
    KEPT_PUSH_TYPES,
    OrderBook,
    accept_posting,
    accept_price,
    accept_push,
    accept_scan,
)
from simulator import SimulationConfig, simulate_shop, write_history

runner = CliRunner()
RECEIVED_AT = 1_780_000_000_000_000_000


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("simulated") / "history"
    write_history(simulate_shop(SimulationConfig(days=20, orders_per_day=20, seed=3)), directory)
    return directory


def fill_book(book: OrderBook, history: Path) -> dict[str, int]:
    """Every record of ``history`` into ``book``, as the live routes would store them."""
    pushes = with_receipt_times(_json_lines(history / "pushes.jsonl"))
    kept = [p for p in pushes if p.get("message_type") in KEPT_PUSH_TYPES]
    postings = _json_lines(history / "postings.jsonl")
    prices = _csv_rows(history / "prices.csv")
    scans = _csv_rows(history / "tracking.csv")
    with book.engine.begin() as connection:
        for posting in postings:
            accept_posting(connection, posting, RECEIVED_AT)
        for push in kept:
            accept_push(connection, push, RECEIVED_AT)
        for row in prices:
            accept_price(connection, row, RECEIVED_AT)
        for row in scans:
            accept_scan(connection, row, RECEIVED_AT)
    return {
        "postings": len(postings),
        "pushes": len(kept),
        "prices": len(prices),
        "scans": len(scans),
    }


@pytest.fixture(scope="module")
def book_url(tmp_path_factory: pytest.TempPathFactory, history: Path) -> str:
    url = "sqlite:///" + str(tmp_path_factory.mktemp("book") / "book.db")
    book = OrderBook(url)
    fill_book(book, history)
    book.close()
    return url


def _without_sources(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    kept = frame.drop(columns=["source_file", "source_line"])
    return kept.sort_values(keys, kind="stable", ignore_index=True)


def test_writes_the_contract_files_with_every_record(tmp_path, history, book_url):
    report = archive_book(book_url, tmp_path / "archive")
    out = tmp_path / "archive"
    assert sorted(p.name for p in out.iterdir()) == [
        "postings.jsonl",
        "prices.csv",
        "pushes.jsonl",
        "tracking.csv",
    ]
    pushes = [
        p for p in _json_lines(history / "pushes.jsonl") if p["message_type"] in KEPT_PUSH_TYPES
    ]
    assert (report.postings, report.pushes, report.prices, report.scans) == (
        len(_json_lines(history / "postings.jsonl")),
        len(pushes),
        len(_csv_rows(history / "prices.csv")),
        len(_csv_rows(history / "tracking.csv")),
    )
    assert (out / "prices.csv").read_text().splitlines()[0] == (
        "offer_id,at,price,old_price,currency_code"
    )
    assert (out / "tracking.csv").read_text().splitlines()[0] == "posting_number,at,status,location"
    # Pushes in the order received; those without a time of their own carry when the book
    # received them.
    archived = _json_lines(out / "pushes.jsonl")
    assert [p["message_type"] for p in archived] == [p["message_type"] for p in pushes]
    assert all(
        "received_at" in p for p in archived if p["message_type"] == "TYPE_DELIVERY_DATE_CHANGED"
    )
    numbers = [p["posting_number"] for p in _json_lines(out / "postings.jsonl")]
    assert numbers == sorted(numbers)
    assert report.format().startswith(f"wrote {out}: {report.postings} postings")


def test_the_loader_reads_the_archive_as_the_records_put_in(tmp_path, history, book_url):
    archive_book(book_url, tmp_path / "archive")
    archived = load_history(tmp_path / "archive")
    original = load_history(history)
    assert archived.rejects.empty
    assert archived.report.postings_kept == original.report.postings_kept
    pd.testing.assert_frame_equal(
        _without_sources(archived.postings, ["posting_number"]),
        _without_sources(original.postings, ["posting_number"]),
    )
    pd.testing.assert_frame_equal(
        archived.items.sort_values(["posting_number", "line_no"], ignore_index=True),
        original.items.sort_values(["posting_number", "line_no"], ignore_index=True),
    )
    keys = ["at", "kind", "posting_number", "offer_id", "state", "location", "price"]
    pd.testing.assert_frame_equal(
        _without_sources(archived.events, keys), _without_sources(original.events, keys)
    )


def test_values_are_written_as_the_rows_hold_them(tmp_path):
    book = OrderBook("sqlite:///" + str(tmp_path / "book.db"))
    rows = [
        {"offer_id": "A-1", "at": "2026-06-01T10:00:00Z", "price": 100.5},
        {"offer_id": "A-2", "at": "2026-06-01T11:00:00Z", "price": "1 299,90", "old_price": None},
        {
            "offer_id": "A,3",
            "at": "2026-06-01T12:00:00.250000Z",
            "price": 7,
            "old_price": "9.000000",
            "currency_code": "CNY",
            "note": "not a contract column",
        },
    ]
    scans = [
        {"posting_number": "1-1-1", "at": "2026-06-02T00:00:00Z", "status": 'в "пути"'},
        {
            "posting_number": "1-1-1",
            "at": "2026-06-02T01:00:00Z",
            "status": "транзит",
            "location": "Москва,\nсклад 2",
        },
    ]
    with book.engine.begin() as connection:
        for row in rows:
            accept_price(connection, row, RECEIVED_AT)
        for row in scans:
            accept_scan(connection, row, RECEIVED_AT)
    write_archive(book.engine, tmp_path / "out")
    book.close()
    text = (tmp_path / "out" / "prices.csv").read_text(encoding="utf-8")
    assert list(csv.reader(io.StringIO(text))) == [
        ["offer_id", "at", "price", "old_price", "currency_code"],
        ["A-1", "2026-06-01T10:00:00Z", "100.5", "", ""],
        ["A-2", "2026-06-01T11:00:00Z", "1 299,90", "", ""],
        ["A,3", "2026-06-01T12:00:00.250000Z", "7", "9.000000", "CNY"],
    ]
    assert _csv_rows(tmp_path / "out" / "tracking.csv") == [
        {**scans[0], "location": ""},
        scans[1],
    ]
    assert (tmp_path / "out" / "postings.jsonl").read_bytes() == b""
    # Prices the loader can read (a comma decimal is one), at the times the rows say.
    events = load_history_events(tmp_path / "out", [{"posting_number": "1-1-1"}])
    prices = events[events["kind"] == "price"]
    assert prices["price"].tolist() == [100.5, 1299.9, 7.0]
    assert prices["old_price"].isna().tolist() == [True, True, False]
    scans_read = events[events["kind"] == "carrier_scan"]
    assert scans_read["location"].tolist()[1] == "Москва,\nсклад 2"


def load_history_events(directory: Path, postings: list[dict[str, Any]]) -> pd.DataFrame:
    """The events the loader reads from ``directory`` once it holds a usable posting."""
    posting = {
        **postings[0],
        "in_process_at": "2026-06-01T00:00:00Z",
        "status": "awaiting_packaging",
        "products": [{"sku": 1, "offer_id": "A-1", "price": "1.0", "quantity": 1}],
    }
    (directory / "postings.jsonl").write_bytes(orjson.dumps(posting) + b"\n")
    tables = load_history(directory)
    assert tables.rejects.empty, tables.rejects
    return tables.events.sort_values("at", kind="stable", ignore_index=True)


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (None, ""),
        ("", ""),
        ("1390.000000", "1390.000000"),
        (1390.0, "1390.0"),
        (7, "7"),
        (0.1, "0.1"),
        (True, "true"),
        ("a,b", "a,b"),
    ],
)
def test_csv_cell(value, cell):
    assert csv_cell(value) == cell


def test_a_non_empty_directory_needs_force(tmp_path, book_url):
    out = tmp_path / "archive"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ArchiveError, match="--force"):
        archive_book(book_url, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    report = archive_book(book_url, out, force=True)
    assert report.replaced
    assert not (out / "notes.txt").exists()
    assert (out / "postings.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive"]  # nothing left beside it


def test_an_empty_directory_is_written_into(tmp_path, book_url):
    (tmp_path / "archive").mkdir()
    assert not archive_book(book_url, tmp_path / "archive").replaced
    assert (tmp_path / "archive" / "pushes.jsonl").is_file()


def test_a_directory_with_subdirectories_is_never_replaced(tmp_path, book_url):
    out = tmp_path / "home"
    (out / "projects").mkdir(parents=True)
    with pytest.raises(ArchiveError, match="not an archive"):
        archive_book(book_url, out, force=True)
    assert [p.name for p in out.iterdir()] == ["projects"]


def test_a_failed_write_leaves_the_previous_archive_and_no_temporary_files(
    tmp_path, book_url, monkeypatch
):
    out = tmp_path / "archive"
    archive_book(book_url, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*_args: Any) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(archive_module, "_write_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        archive_book(book_url, out, force=True)
    with pytest.raises(OSError, match="disk full"):
        archive_book(book_url, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive"]


def test_a_missing_book_is_refused(tmp_path):
    with pytest.raises(ArchiveError, match="no book at"):
        archive_book("sqlite:///" + str(tmp_path / "absent.db"), tmp_path / "out")
    assert not (tmp_path / "absent.db").exists()


def test_the_archive_command(tmp_path, book_url):
    out = tmp_path / "archive"
    result = runner.invoke(app, ["archive", "--db", book_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "postings" in result.stdout and "scans" in result.stdout
    again = runner.invoke(app, ["archive", "--db", book_url, "--out", str(out)])
    assert again.exit_code == 2
    assert "--force" in again.output
    forced = runner.invoke(app, ["archive", "--db", book_url, "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert forced.stdout.startswith("replaced")


def test_the_files_are_one_snapshot_of_the_book(tmp_path, monkeypatch):
    """A record the service commits while the archive is being written is in none of its files."""
    book = OrderBook("sqlite:///" + str(tmp_path / "book.db"))
    with book.engine.begin() as connection:
        accept_posting(connection, {"posting_number": "early-1"}, RECEIVED_AT)
        accept_push(connection, late_push("early-1"), RECEIVED_AT)
    write_json_lines = archive_module._write_json_lines
    late = late_push("late-1")

    def writing_meanwhile(path: Path, records: Any) -> int:
        count = write_json_lines(path, records)
        if path.name == "postings.jsonl":
            with book.engine.begin() as connection:
                accept_posting(connection, {"posting_number": "late-1"}, RECEIVED_AT)
                accept_push(connection, late, RECEIVED_AT)
                accept_scan(connection, {"posting_number": "late-1", "at": "x"}, RECEIVED_AT)
        return count

    monkeypatch.setattr(archive_module, "_write_json_lines", writing_meanwhile)
    report = write_archive(book.engine, tmp_path / "out")
    archived = (tmp_path / "out" / "pushes.jsonl").read_text() + (
        tmp_path / "out" / "tracking.csv"
    ).read_text()
    assert "late-1" not in archived
    assert report.pushes == len(_json_lines(tmp_path / "out" / "pushes.jsonl"))
    monkeypatch.undo()
    assert write_archive(book.engine, tmp_path / "out2").pushes == report.pushes + 1
    book.close()


def late_push(number: str) -> dict[str, Any]:
    return {"message_type": "TYPE_STATE_CHANGED", "posting_number": number, "new_state": "x"}
