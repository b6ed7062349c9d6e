"""End to end: train on a simulated history, register in a real ``mlflow server``, serve the
champion with ``cancel-risk serve`` (real uvicorn) and score over HTTP on loopback; then stop the
tracking server: a reload asked then is refused (503) and the loaded model keeps scoring; and the
service started again serves its cached model.

Every process is started in its own session and stopped in teardown; all files live under
``tmp_path``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest

from benchmarks.harness import stop_process
from cancel_risk.examples import latest_moment, load_history_records, open_score_requests
from core.ingest import tables_from_objects

KEY = "e2e-scoring-key"
ADMIN = "e2e-admin-key"
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as output:
        return subprocess.Popen(
            command,
            cwd=cwd,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: teardown stops its workers too
        )


def _wait_for(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[:3]} exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"{url} not ready after {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture
def mlflow_server(
    tmp_path: Path, empty_tracking_db: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    directory = tmp_path / "tracking-server"
    directory.mkdir()
    (directory / "mlflow.db").write_bytes(empty_tracking_db.read_bytes())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = directory / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}"),
        *("--artifacts-destination", str(directory / "artifacts")),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = _start(command, log, directory, env)
    try:
        _wait_for(f"{url}/health", process, log)
        yield url, process
    finally:
        stop_process(process)


def _serve(tmp_path: Path, tracking_url: str, name: str) -> tuple[str, subprocess.Popen, Path]:
    port = _free_port()
    log = tmp_path / f"{name}.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_url,
        "CANCEL_RISK_API_KEYS": KEY,
        "CANCEL_RISK_ADMIN_KEY": ADMIN,
        "CANCEL_RISK_MODEL_CACHE_DIR": str(tmp_path / "model-cache"),
        "CANCEL_RISK_REGISTRY_TIMEOUT_SECONDS": "3",
        "CANCEL_RISK_REGISTRY_MAX_RETRIES": "0",
    }
    cli = Path(sys.executable).with_name("cancel-risk")
    command = [str(cli), "serve", "--port", str(port)]
    return f"http://127.0.0.1:{port}", _start(command, log, tmp_path, env), log


@pytest.mark.slow
def test_train_register_serve_and_score_over_http(
    mlflow_server: tuple[str, subprocess.Popen],
    simulated_history: Path,
    fast_training: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.pyfunc import load_risk_model
    from training.config import load_training_config
    from training.train import train_from_history

    tracking_url, tracking_process = mlflow_server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_url)
    mlflow.set_tracking_uri(tracking_url)
    try:
        trained = train_from_history(
            simulated_history,
            config=load_training_config(overrides=fast_training),
            promote_if_better=True,
        )
        assert trained.promoted
        champion = load_risk_model(f"models:/cancel-risk/{trained.model_version}")
    finally:
        mlflow.set_tracking_uri(None)

    records = load_history_records(simulated_history)
    as_of = latest_moment(records)
    requests = open_score_requests(records, as_of, limit=5, latest_per_kind=20)
    assert requests
    headers = {"X-API-Key": KEY}

    url, service, log = _serve(tmp_path, tracking_url, "service")
    try:
        _wait_for(f"{url}/readyz", service, log)
        info = httpx.get(f"{url}/v1/model", headers=headers).json()
        assert (info["source"], info["version"]) == ("registry", trained.model_version)
        assert info["alias"] == "champion" and info["scoring_path"] == "fast"
        for request in requests:
            response = httpx.post(f"{url}/v1/score", json=request, headers=headers, timeout=30)
            assert response.status_code == 200, response.text
            scored = response.json()
            assert scored["model"]["version"] == trained.model_version
            tables = tables_from_objects(
                [request["posting"]],
                pushes=request["pushes"],
                prices=request["prices"],
                tracking=request["tracking"],
            )
            expected = champion.score_tables(tables, pd.Timestamp(as_of, tz="UTC"))
            assert abs(scored["probability"] - expected["probability"].iloc[0]) <= 1e-9
        batch = httpx.post(
            f"{url}/v1/score/batch", json={"items": requests}, headers=headers, timeout=30
        )
        assert batch.status_code == 200 and batch.json()["scored"] == len(requests)
        assert httpx.post(f"{url}/v1/score", json=requests[0]).status_code == 401
        assert "cancel_risk_scores_total" in httpx.get(f"{url}/metrics").text

        # The tracking server goes down; a reload asked now is refused, the model keeps scoring.
        stop_process(tracking_process)
        reload = httpx.post(f"{url}/v1/model/reload", headers={"X-API-Key": ADMIN}, timeout=60)
        assert reload.status_code == 503
        outcome = reload.json()
        assert outcome["status"] == "unreachable"
        assert "the tracking server is unreachable" in outcome["message"]
        assert outcome["message"].endswith(f"still serving version {trained.model_version}")
        info = httpx.get(f"{url}/v1/model", headers=headers).json()
        assert (info["source"], info["version"]) == ("registry", trained.model_version)
        response = httpx.post(f"{url}/v1/score", json=requests[0], headers=headers, timeout=30)
        assert response.status_code == 200
        assert response.json()["model"]["version"] == trained.model_version
    finally:
        stop_process(service)
    # uvicorn shuts down gracefully on SIGTERM, then exits by that signal.
    assert "Application shutdown complete" in log.read_text()

    # Still down: the service starts from the model it cached.
    url, service, log = _serve(tmp_path, tracking_url, "service-after-outage")
    try:
        _wait_for(f"{url}/readyz", service, log)
        info = httpx.get(f"{url}/v1/model", headers=headers).json()
        assert (info["source"], info["version"]) == ("local_cache", trained.model_version)
        assert "unreachable" in info["registry_error"]
        response = httpx.post(f"{url}/v1/score", json=requests[0], headers=headers, timeout=30)
        assert response.status_code == 200
    finally:
        stop_process(service)
    for secret in (KEY, ADMIN):
        assert secret not in log.read_text()
