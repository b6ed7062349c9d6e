"""The service under steady load and under fuzzing, in short runs (``make reliability`` runs the
five-minute soak and the 1,000-request fuzz): the same checks, on a real ``cancel-risk serve``
process and a real model, driven over HTTP from this process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import fuzz, soak

SOAK_TARGETS = argparse.Namespace(max_p99_ratio=1.5, max_rss_growth=0.10)


# --- the checks themselves can fail --------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "status", "content_type", "body", "problem"),
    [
        ("POST /v1/score", 500, "application/json", b'{"detail":"internal error"}', "server error"),
        ("POST /v1/score", 502, "text/plain", b"bad gateway", "server error"),
        ("POST /v1/score", 422, "text/plain", b"bad", "not JSON"),
        ("POST /v1/score", 422, "application/json", b"{not json", "not JSON"),
        ("POST /v1/score", 401, "application/json", b'{"error":"no"}', "without a detail"),
        ("POST /v1/score", 401, "application/json", b'{"detail":" "}', "empty detail"),
        ("POST /v1/score", 422, "application/json", b'{"detail":[]}', "without a detail"),
        ("POST /v1/score", 422, "application/json", b'{"detail":[{"loc":[],"msg":"x"}]}', "path"),
        ("POST /v1/score", 422, "application/json", b'{"detail":[{"loc":["b"]}]}', "message"),
        ("POST /v1/score", 200, "application/json", b'{"probability": 1.5}', "probability 1.5"),
        ("POST /v1/score", 200, "application/json", b'{"probability": NaN}', "probability"),
    ],
)
def test_the_fuzz_check_flags_bad_responses(
    operation: str, status: int, content_type: str, body: bytes, problem: str
) -> None:
    problems = fuzz.response_problems(operation, status, content_type, body)
    assert problems and problem in problems[0]


def test_the_fuzz_check_passes_responses_that_name_the_problem() -> None:
    good = [
        (401, b'{"detail":"an API key is required in the X-API-Key header"}'),
        (413, b'{"detail":"the request body is larger than the limit of 1024 bytes"}'),
        (422, b'{"detail":[{"loc":["body","as_of"],"msg":"not a date","type":"value_error"}]}'),
        (200, b'{"probability": 0.25}'),
    ]
    for status, body in good:
        assert fuzz.response_problems("POST /v1/score", status, "application/json", body) == []


def _record(latencies: list[float], failed: int = 0) -> soak.LoadRecord:
    record = soak.LoadRecord()
    for i, latency in enumerate(latencies):
        record.started.append(i * 20.0 / len(latencies))
        record.latency.append(latency)
        record.ok.append(i >= failed)
    return record


def _soak_report(record: soak.LoadRecord, rss: list[tuple[float, float]]) -> dict:
    report = soak.summarise_load(record, rss, duration_s=20.0, window_s=5.0)
    ok = report["requests"]["ok"]
    report["server"] = {"by_status": {"200": ok}, "non_200": 0, "error_log_lines": []}
    return report


def test_the_soak_targets_flag_failures_latency_drift_and_memory_growth() -> None:
    steady = [0.010] * 1000
    flat = [(0.0, 300.0), (10.0, 301.0), (20.0, 302.0)]
    assert soak.check_targets(_soak_report(_record(steady), flat), SOAK_TARGETS) == []

    missed = soak.check_targets(_soak_report(_record(steady, failed=1), flat), SOAK_TARGETS)
    assert any("1 failed" in m for m in missed)

    drifting = [0.010] * 750 + [0.020] * 250  # the last quarter twice as slow
    missed = soak.check_targets(_soak_report(_record(drifting), flat), SOAK_TARGETS)
    assert any("p99" in m for m in missed)

    growing = [(0.0, 300.0), (10.0, 320.0), (20.0, 340.0)]  # +13 %
    missed = soak.check_targets(_soak_report(_record(steady), growing), SOAK_TARGETS)
    assert any("memory grew" in m for m in missed)

    report = _soak_report(_record(steady), flat)
    report["server"]["by_status"] = {"200": 990, "500": 10}
    report["server"]["non_200"] = 10
    assert len(soak.check_targets(report, SOAK_TARGETS)) == 2


# --- short runs against the real service ---------------------------------------------------------


@pytest.mark.slow
def test_a_short_soak_at_concurrency_32_fails_nothing_drifts_nothing_and_leaks_nothing(
    trained_model_dir: Path, trained_shop, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    code = soak.main(
        [
            *("--model", str(trained_model_dir), "--history", str(trained_shop.history_dir)),
            *("--duration", "24", "--window", "8", "--warmup", "4", "--concurrency", "32"),
            *("--out-json", str(out)),
        ]
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    requests = report["requests"]
    assert requests["measured"] > 1000 and requests["failed"] == 0, requests
    assert report["server"]["by_status"] == {
        "200": requests["ok"] + requests["warmup"] - requests["warmup_failed"]
    }
    assert report["latency"]["p99_ratio_last_to_first"] <= 1.5, report["latency"]
    assert report["rss"]["growth_fraction"] < 0.10, report["rss"]
    assert report["server"]["error_log_lines"] == []
    assert code == 0, report["missed"]


@pytest.mark.slow
def test_a_short_fuzz_from_the_openapi_document_gets_no_5xx_and_only_named_4xx(
    trained_model_dir: Path, trained_shop, tmp_path: Path
) -> None:
    out = tmp_path / "fuzz.json"
    code = fuzz.main(
        [
            *("--model", str(trained_model_dir), "--history", str(trained_shop.history_dir)),
            *("--min-requests", "200", "--examples", "12", "--out-json", str(out)),
        ]
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["requests"] >= 200
    assert report["server_errors"] == 0, report["failures"]
    assert report["failed_checks"] == 0, report["failures"]
    assert report["client_errors"] > 0  # the 4xx checks did run
    assert {"schema", "mutation"} <= set(report["by_source"])
    operations = {op.split(" ", 1)[1] for op in report["by_operation"]}
    assert {"/v1/score", "/v1/score/batch", "/v1/model", "/v1/model/reload"} <= operations
    assert report["service_alive_at_end"] and report["error_log_lines"] == []
    assert code == 0, report["missed"]
