"""The inspection summary, its text form, and `cancel-risk inspect` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cancel_risk.cli import app
from core.ingest import load_history
from core.tables import EVENT_KINDS
from training.inspect import REJECTS_SHOWN, format_summary, summarize

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


@pytest.fixture(scope="module")
def summary() -> dict:
    return summarize(load_history(FIXTURES / "shop"))


def test_summary_counts(summary: dict) -> None:
    assert summary["postings_read"] == 21
    assert summary["postings_kept"] == 10
    assert summary["postings_rejected"] == 9
    assert summary["duplicates_merged"] == 2
    assert summary["postings_by_status"] == {
        "cancelled": 6,
        "awaiting_deliver": 1,
        "delivered": 1,
        "delivering": 1,
        "some_future_status": 1,
    }
    assert summary["open_postings"] == 3
    assert summary["buyer_cancellations"] == 3
    assert summary["other_cancellations"] == {"unknown": 2, "seller": 1}
    assert summary["date_range"] == {
        "first_order_at": "2026-04-09T04:00:00.500000+00:00",
        "last_order_at": "2026-04-10T17:00:00+00:00",
        "latest_event_at": "2026-04-12T16:00:00+00:00",
    }
    assert list(summary["events_by_kind"]) == list(EVENT_KINDS)
    assert summary["events_by_kind"]["price"] == 3
    assert summary["files"]["postings.jsonl"] == 18
    assert summary["missing_optional"] == []
    assert len(summary["rejects"]) == 18
    assert summary["rejects"][0] == {
        "file": "postings_page1.json",
        "line": 2,
        "reason": "posting #2: price '-5.00' of product 1 is negative",
    }


def test_summary_is_plain_json(summary: dict) -> None:
    assert json.loads(json.dumps(summary, ensure_ascii=False)) == summary


def test_text_report_names_what_matters(summary: dict) -> None:
    text = format_summary(summary)
    assert text.startswith("postings: 21 read, 10 kept, 9 rejected, 2 duplicates merged")
    assert "buyer cancellations: 3" in text
    assert "postings.jsonl:11" in text and "price 'abc' of product 2 is not a number" in text
    assert "skipped 3 pushes of unused types" in text
    assert "carrier_scan" in text


def test_text_report_shortens_long_reject_lists(summary: dict) -> None:
    many = {**summary, "rejects": summary["rejects"] * 3}
    text = format_summary(many)
    assert f"... and {len(many['rejects']) - REJECTS_SHOWN} more (see --json)" in text


def test_cli_inspect_json() -> None:
    result = CliRunner().invoke(app, ["inspect", "--history", str(FIXTURES / "pages"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["postings_read"] == 8
    assert payload["postings_kept"] == 7
    assert payload["postings_rejected"] == 1
    assert payload["rejects"] == [
        {"file": "postings_b_v4.json", "line": 2, "reason": "posting #2: no posting_number"}
    ]
    assert payload["missing_optional"] == [
        "pushes.jsonl",
        "prices.csv",
        "tracking.csv",
        "products.jsonl",
    ]


def test_cli_inspect_csv_option_counts_buyer_cancellations() -> None:
    directory = str(FIXTURES / "cabinet_new")
    plain = json.loads(
        CliRunner().invoke(app, ["inspect", "--history", directory, "--json"]).stdout
    )
    declared = json.loads(
        CliRunner()
        .invoke(
            app,
            ["inspect", "--history", directory, "--json", "--csv-cancellations-are-buyer"],
        )
        .stdout
    )
    assert (plain["buyer_cancellations"], plain["other_cancellations"]) == (0, {"unknown": 1})
    assert (declared["buyer_cancellations"], declared["other_cancellations"]) == (1, {})


def test_cli_inspect_text() -> None:
    result = CliRunner().invoke(app, ["inspect", "--history", str(FIXTURES / "cabinet_old")])
    assert result.exit_code == 0, result.output
    assert "postings: 3 read, 3 kept, 0 rejected" in result.stdout


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "absent", "does not exist"),
        (lambda root: root, "no postings in"),
    ],
)
def test_cli_inspect_fails_with_one_clear_line(tmp_path: Path, make, message: str) -> None:
    result = CliRunner().invoke(app, ["inspect", "--history", str(make(tmp_path))])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_inspect_names_a_missing_column(tmp_path: Path) -> None:
    (tmp_path / "postings.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "prices.csv").write_text("offer_id;at\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["inspect", "--history", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: prices.csv: required column 'price' is missing"
