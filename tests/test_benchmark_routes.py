"""The route benchmark (`python -m benchmarks.routes`) on a small trained shop: every route is
measured and the point-in-time primitive's two algorithms are timed on the same input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import routes


@pytest.mark.slow
def test_the_route_benchmark_measures_every_route(trained_shop, trained_model_dir: Path) -> None:
    report = routes.measure_routes(
        str(trained_shop.history_dir), str(trained_model_dir), requests=6, repeats=1
    )
    assert set(report) == {
        "prepare_fast (checks, features to come)",
        "prepare_fast: parse_request",
        "features of one request",
        "features of all requests in one pass",
        "prepare_reference",
        "prepare_reference: tables_from_objects",
        "prepare_reference: build_features",
        "score (one row)",
    }
    for figures in report.values():
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] < math.inf
    latest = routes.measure_latest_row(1, sizes=[(20, 1), (300, 30)])
    assert list(latest) == ["20 rows, 1 queries", "300 rows, 30 queries"]
    table = routes.format_report(report, latest)
    assert "| features of one request |" in table and "| 300 rows, 30 queries |" in table
