"""The REST benchmark's MLServer peer, without MLServer: its request bodies, its repository of
settings files, the missing-install message, the listener check and the report's verdicts."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import lightgbm as lgb
import numpy as np
import pytest

from benchmarks import harness, rest, rest_servers


def _booster() -> tuple[lgb.Booster, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 4))
    x[rng.random(x.shape) < 0.2] = np.nan
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]) > 0).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=5), x


def test_mlserver_body_is_one_v2_row_with_missing_values_as_null() -> None:
    row = [1.5, math.nan, -2.0, 0.0]
    body = rest_servers.mlserver_body(row)
    # Strict JSON (MLServer reads it with orjson, which refuses NaN literals).
    request = json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} in body"))
    assert request == {
        "inputs": [
            {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [1.5, None, -2.0, 0.0]}
        ]
    }
    # What MLServer's NumPy codec makes of it: the same row, NaN where it was missing.
    decoded = np.array(request["inputs"][0]["data"], "float64")
    np.testing.assert_array_equal(decoded, np.array(row))


def test_mlserver_body_refuses_infinity() -> None:
    with pytest.raises(ValueError):
        rest_servers.mlserver_body([math.inf, 1.0])


def test_mlserver_prediction_reads_the_v2_response() -> None:
    output = {"name": "predict", "shape": [1, 1], "datatype": "FP64", "data": [0.25]}
    body = json.dumps({"model_name": "lgbm", "outputs": [output]}).encode()
    assert rest_servers.mlserver_prediction(body) == 0.25


def test_write_mlserver_models(tmp_path: Path) -> None:
    booster, x = _booster()
    models = rest_servers.write_mlserver_models(tmp_path / "models", booster, [18080, 18081, 18082])
    settings = json.loads((models / "settings.json").read_text())
    assert settings == {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": 18080,
        "grpc_port": 18081,
        "parallel_workers": 0,
        "metrics_endpoint": None,
        "metrics_port": 18082,
        "load_models_at_startup": True,
    }
    model_settings = json.loads((models / "lgbm" / "model-settings.json").read_text())
    assert model_settings == {
        "name": "lgbm",
        "implementation": "mlserver_lightgbm.LightGBMModel",
        "parameters": {"uri": "./model.txt", "version": "v1"},
    }
    # The runtime loads the file as lgb.Booster(model_file=...): the same answers, NaN included.
    saved = lgb.Booster(model_file=str(models / "lgbm" / "model.txt"))
    np.testing.assert_array_equal(saved.predict(x), booster.predict(x))


def test_missing_mlserver_fails_at_once_naming_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="make bench-rest"):
        rest.main(["--mlserver", str(tmp_path / "absent" / "mlserver")])


def test_found_mlserver_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "bin" / "mlserver"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert rest_servers.find_mlserver(Path("bin/mlserver")) == binary


def test_mlserver_environment_pins_one_thread_and_its_own_path() -> None:
    env = rest_servers.mlserver_environment(Path("/opt/ms/bin/mlserver"))
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == "/opt/ms/bin"
    assert "VIRTUAL_ENV" not in env


def test_free_ports_are_distinct() -> None:
    ports = harness.free_ports(3)
    assert len(set(ports)) == 3


def test_check_listener_knows_whose_port_it_is() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        me = SimpleNamespace(pid=os.getpid())
        harness.check_listener(port, me)  # type: ignore[arg-type]
        idle = harness.free_port()
        with pytest.raises(RuntimeError, match="not served by the process started here"):
            harness.check_listener(idle, me)  # type: ignore[arg-type]


def test_answer_check_rows_take_missing_values_first() -> None:
    rows = [[1.0], [math.nan], [2.0], [math.nan]]
    assert rest_servers.answer_check_rows(rows, count=1) == [1, 0, 2]


def _figures(name: str, p99: float, rps8: float) -> dict:
    return {
        "name": name,
        "p50_ms": p99 / 2,
        "p95_ms": p99 * 0.8,
        "p99_ms": p99,
        "rps": {"8": rps8, "32": rps8 * 1.2},
        "errors": 0,
        "peak_rss_mb": 200.0,
    }


def _report(mlserver: dict | None) -> dict:
    service = _figures("cancel-risk serve", 1.8, 900.0)
    mlflow = _figures("mlflow models serve", 2.4, 500.0)
    batch = {"postings": 1000, "calls": 5, "median_s": 0.2, "max_s": 0.25, "errors": 0}
    batch["body_mb"] = 3.0
    peers = {"mlflow": mlflow} if mlserver is None else {"mlflow": mlflow, "mlserver": mlserver}
    as_figures = {k: rest.ServerFigures(**v, peak_rss_tree_mb=0.0) for k, v in peers.items()}
    service_figures = rest.ServerFigures(**service, peak_rss_tree_mb=0.0)
    check = {"rows": 25, "rows_with_missing": 20, "max_abs_difference": 0.0}
    return {
        "started": "2026-12-03T00:00:00Z",
        "command": "python -m benchmarks.rest",
        "machine": {"cpus": 2, "load_average_before": [1.0], "load_average_after": [2.0]},
        "model": {"trees": 300},
        "requests": {
            "repeats": 3,
            "distinct": 300,
            "mean_events": 20,
            "rows_with_missing_values": 40,
        },
        "threads": {"service": "its own", "mlflow": "OMP_NUM_THREADS=1", "mlserver": "1"},
        "answers_checked": {k: check for k in peers},
        "service": service,
        **peers,
        "mlserver": mlserver,
        "mlserver_skipped": "--no-mlserver" if mlserver is None else None,
        "ratios": {k: rest._ratios(service_figures, v) for k, v in as_figures.items()},
        "batch": batch,
        "targets": rest.target_checks(service, mlserver, batch),
    }


def test_report_states_each_target_met_or_missed_against_both_peers() -> None:
    report = _report(_figures("MLServer (LightGBM runtime)", 1.2, 1000.0))
    assert [c["met"] for c in report["targets"]] == [True, False, False]
    assert report["ratios"]["mlserver"]["rps_c8"] == pytest.approx(0.9)
    assert report["ratios"]["mlflow"]["p99_ms"] == pytest.approx(0.75)
    markdown = rest.format_markdown(report)
    assert "sequential p99 <= 2 ms: **met**: 1.80 ms (0.20 ms under the limit)" in markdown
    assert "req/s at c=8 >= MLServer's: **missed**: 900 against 1,000 req/s" in markdown
    assert "postings <= 0.15 s (median call): **missed**: 0.200 s (0.050 s over" in markdown
    assert "| MLServer (LightGBM runtime) | 1.50x | 1.50x | 1.50x | 0.90x | 0.90x |" in markdown
    assert "| mlflow models serve | 0.75x | 0.75x | 0.75x | 1.80x | 1.80x |" in markdown


def test_report_says_when_mlserver_was_left_out() -> None:
    report = _report(None)
    assert report["targets"][1]["met"] is None
    markdown = rest.format_markdown(report)
    assert "MLServer was not run (`--no-mlserver`)." in markdown
    assert "not measured (MLServer not run)" in markdown
    assert "MLServer LightGBM runtime" not in markdown
