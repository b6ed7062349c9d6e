"""The cause-analysis report: its numbers, and that a real browser opens it and draws its charts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cancel_risk.cli import app
from core.counterfactuals import CAUSES
from training.report import build_cause_analysis, render_report_html, write_report

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def analysis(trained_shop):
    return build_cause_analysis(trained_shop.tables, trained_shop.as_of, trained_shop.model)


def test_rates_cover_every_dimension_with_counts(analysis):
    assert set(analysis.rates) == {
        "carrier",
        "price change since purchase",
        "lateness",
        "tracking silence (handed over)",
        "card edits since purchase",
        "region",
        "payment type",
    }
    for table in analysis.rates.values():
        assert table["moments"].sum() == analysis.moments
        assert table["buyer_cancel_rate"].between(0, 1).all()
    silence = analysis.rates["tracking silence (handed over)"].set_index("bucket")
    # The simulator's buyers lose patience with silent tracking: the report must show it.
    assert (
        silence.loc["over 7 days", "buyer_cancel_rate"]
        > silence.loc["under 1 day", "buyer_cancel_rate"]
    )


def test_open_orders_are_ranked_by_expected_loss_with_reasons(analysis):
    orders = analysis.open_orders
    assert len(orders) > 100
    assert orders["expected_loss"].is_monotonic_decreasing
    assert orders.loc[orders["risk_level"] == "high", "reasons"].str.len().gt(0).mean() > 0.9
    assert set(analysis.risk_by_cause["cause"]) == set(CAUSES)
    assert (analysis.risk_by_cause["risk_share"] >= 0).all()


def _browser(*args: str, user_data: Path) -> str:
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="make test installs chromium; run through make")
def test_the_report_opens_in_a_browser_and_draws_every_chart(analysis, tmp_path):
    path = write_report(analysis, tmp_path / "report.html")
    html = path.read_text(encoding="utf-8")
    charts = html.count('<svg class="chart"')
    assert charts == 1 + len(analysis.rates)
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    dom = _browser("--dump-dom", path.as_uri(), user_data=tmp_path / "profile-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-charts-drawn="{charts}"' in body
    assert "data-errors" not in body
    shot = tmp_path / "report.png"
    _browser(
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        path.as_uri(),
        user_data=tmp_path / "profile-shot",
    )
    assert shot.stat().st_size > 20_000


def test_report_command_writes_the_page(trained_shop, tmp_path):
    model_dir = trained_shop.model.save(tmp_path / "model")
    out = tmp_path / "out" / "report.html"
    result = CliRunner().invoke(
        app,
        [
            "report",
            "--history",
            str(trained_shop.history_dir),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--lang",
            "ru",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Свяжитесь с покупателем" in out.read_text(encoding="utf-8")
    bad = CliRunner().invoke(
        app,
        [
            "report",
            "--history",
            str(tmp_path / "nowhere"),
            "--model",
            str(model_dir),
            "--out",
            str(out),
        ],
    )
    assert bad.exit_code == 2
    assert "Traceback" not in bad.output


def test_rendering_is_deterministic(analysis):
    assert render_report_html(analysis) == render_report_html(analysis)
