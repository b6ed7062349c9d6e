"""The servers the REST benchmark measures, and what each of them is sent.

``cancel-risk serve`` gets the score requests; the two servers of the same model's bare booster,
``mlflow models serve`` of the booster saved alone and MLServer's LightGBM runtime (in its own
environment), get the same orders' prebuilt feature rows (:func:`prepare`). Each is started as
its own process on free loopback ports (:func:`start_servers`), and a bare server must give
``booster.predict``'s answers on rows with missing values (:func:`answer_check_rows`) before it
is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    API_KEY,
    Connection,
    Target,
    build_service_requests,
    free_port,
    free_ports,
    model_and_history,
    spawn,
    start_service,
)

# --- preparation -------------------------------------------------------------------------------


@dataclass
class Workload:
    model_dir: Path
    booster_dir: Path
    requests: list[dict[str, Any]]
    feature_rows: list[list[float]]
    feature_columns: list[str]
    trees: int
    booster: Any = None
    expected: list[float] = field(default_factory=list)


# --- MLServer (its LightGBM runtime, in its own environment) -----------------------------------

MLSERVER_MODEL = "lgbm"
DEFAULT_MLSERVER = Path(".venv-mlserver/bin/mlserver")
# The bare-predict servers call LightGBM with its default threads (all cores), which on a
# shared two-core machine spin against the load generator and the other servers; one thread
# each. `cancel-risk serve` sets its own: one thread for a matrix of up to 512 rows.
BARE_PREDICT_ENV = {"OMP_NUM_THREADS": "1"}


def find_mlserver(path: Path) -> Path:
    """The ``mlserver`` command at ``path``, absolute; exits at once naming the fix if absent."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SystemExit(
            f"MLServer not found at {path}: `make bench-rest` creates .venv-mlserver from "
            "benchmarks/mlserver-requirements.txt and runs this benchmark with it; or pass "
            "--mlserver PATH, or --no-mlserver to leave MLServer out of the run"
        )
    return path.absolute()


def mlserver_body(row: Sequence[float]) -> bytes:
    """The V2 inference request of one feature row, a missing value (NaN) sent as ``null``.

    MLServer parses bodies with orjson, which refuses the NaN literal MLflow's bodies carry;
    its NumPy codec turns ``null`` back into NaN (``np.array(data, "float64")``), so the
    booster gets exactly the row MLflow's server gets.
    """
    data = [None if math.isnan(value) else float(value) for value in row]
    request = {
        "inputs": [{"name": "input-0", "shape": [1, len(data)], "datatype": "FP64", "data": data}]
    }
    return json.dumps(request, allow_nan=False).encode()


def mlserver_prediction(body: bytes) -> float:
    """The probability of a V2 inference response for one row."""
    return float(json.loads(body)["outputs"][0]["data"][0])


def write_mlserver_models(models_dir: Path, booster: Any, ports: Sequence[int]) -> Path:
    """MLServer's repository for ``booster``: ``settings.json`` (loopback, the HTTP, gRPC and
    metrics ports given, inference in the server's own process: ``parallel_workers`` 0) and
    ``lgbm/model-settings.json`` with the booster saved beside it as text."""
    http_port, grpc_port, metrics_port = ports
    model_dir = models_dir / MLSERVER_MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "parallel_workers": 0,
        "metrics_endpoint": None,
        "metrics_port": metrics_port,
        "load_models_at_startup": True,
    }
    model_settings = {
        "name": MLSERVER_MODEL,
        "implementation": "mlserver_lightgbm.LightGBMModel",
        "parameters": {"uri": "./model.txt", "version": "v1"},
    }
    booster.save_model(str(model_dir / "model.txt"))
    (models_dir / "settings.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (model_dir / "model-settings.json").write_text(
        json.dumps(model_settings, indent=2), encoding="utf-8"
    )
    return models_dir


def mlserver_environment(binary: Path) -> dict[str, str]:
    """This environment for MLServer's own: its bin directory first on PATH, none of this
    interpreter's variables, one LightGBM thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{binary.parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **BARE_PREDICT_ENV}


def start_mlserver(binary: Path, models_dir: Path, log: Path) -> subprocess.Popen:
    """``mlserver start .`` from the repository's directory, its own process (no shell)."""
    return spawn([str(binary), "start", "."], log, mlserver_environment(binary), cwd=models_dir)


def prepare(args: argparse.Namespace, work: Path, env: dict[str, str]) -> Workload:
    import mlflow.lightgbm

    from core.model import RiskModel
    from serving.scoring import ModelScorer, ScoreJob, build_feature_frame

    model_dir, history = model_and_history(args, work, env)
    model = RiskModel.load(model_dir)
    requests = build_service_requests(history, args.requests, args.events_per_kind)
    scorer = ModelScorer(model)
    rows = []
    for request in requests:
        as_of = int(np.datetime64(request["as_of"].rstrip("Z"), "ns").astype("int64"))
        job = ScoreJob(
            request["posting"], request["pushes"], request["prices"], request["tracking"]
        )
        prepared = scorer.prepare_fast(job, as_of, ())
        assert prepared is not None
        rows.append(prepared)
    matrix = model.build_matrix(
        build_feature_frame([p.row for p in rows], [p.posting_number for p in rows])
    )
    booster_dir = work / "booster-model"
    if booster_dir.exists():
        shutil.rmtree(booster_dir)
    mlflow.lightgbm.save_model(model.booster, str(booster_dir))
    # Missing values travel to MLflow as NaN literals, which its JSON reader accepts (null is
    # refused); to MLServer as null (see mlserver_body).
    feature_rows = [[float(v) for v in row] for row in matrix]
    return Workload(
        model_dir=Path(model_dir),
        booster_dir=booster_dir,
        requests=requests,
        feature_rows=feature_rows,
        feature_columns=list(model.feature_columns),
        trees=model.booster.num_trees(),
        booster=model.booster,
        expected=[float(p) for p in model.booster.predict(matrix, num_threads=1)],
    )


# --- the servers -------------------------------------------------------------------------------


@dataclass
class Server:
    """A server started by the benchmark: what it is, how to reach it, and its process."""

    key: str
    target: Target
    process: subprocess.Popen
    ready_path: str
    log: Path
    threads: str
    parse: Callable[[bytes], float] | None = None


async def check_answers(server: Server, indices: Sequence[int], expected: Sequence[float]) -> float:
    """The largest difference between the server's answers for these rows and the booster's."""
    assert server.parse is not None
    connection = Connection(server.target)
    await connection.open()
    worst = 0.0
    try:
        for i in indices:
            status, body = await connection.send(server.target.request(server.target.bodies[i]))
            if status != 200:
                raise RuntimeError(f"{server.target.name}: {status} for row {i}: {body[:300]!r}")
            worst = max(worst, abs(server.parse(body) - expected[i]))
    finally:
        await connection.close()
    if worst > 1e-9:
        raise RuntimeError(f"{server.target.name} differs from booster.predict by {worst:.3g}")
    return worst


def answer_check_rows(rows: Sequence[Sequence[float]], count: int = 20) -> list[int]:
    """Rows to check the bare servers on: up to ``count`` with a missing value, then 5 more."""
    missing = [i for i, row in enumerate(rows) if any(math.isnan(v) for v in row)]
    complete = [i for i, row in enumerate(rows) if not any(math.isnan(v) for v in row)]
    return missing[:count] + complete[:5]


def _thread_note(env: dict[str, str], own: str) -> str:
    value = env.get("OMP_NUM_THREADS")
    return own if value is None else f"{own}; OMP_NUM_THREADS={value}"


def start_servers(
    workload: Workload, work: Path, env: dict[str, str], mlserver: Path | None
) -> list[Server]:
    """The servers, each in its own process on free loopback ports; stopped by the caller."""
    servers: list[Server] = []
    service, service_port, service_log = start_service(workload.model_dir, work, env)
    servers.append(
        Server(
            "service",
            Target(
                "cancel-risk serve",
                "127.0.0.1",
                service_port,
                "/v1/score",
                [json.dumps(r, ensure_ascii=False).encode() for r in workload.requests],
                {"X-API-Key": API_KEY},
            ),
            service,
            "/readyz",
            service_log,
            _thread_note(env, "its own: LightGBM num_threads=1 up to 512 rows, else all cores"),
        )
    )
    mlflow_port = free_port()
    mlflow_command = [
        sys.executable,
        *("-m", "mlflow", "models", "serve", "-m", str(workload.booster_dir)),
        *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1"),
    ]
    mlflow_bodies = [
        json.dumps(
            {"dataframe_split": {"columns": workload.feature_columns, "data": [row]}}
        ).encode()
        for row in workload.feature_rows
    ]
    mlflow_env = {**env, **BARE_PREDICT_ENV}
    mlflow_log = work / "mlflow.log"
    servers.append(
        Server(
            "mlflow",
            Target("mlflow models serve", "127.0.0.1", mlflow_port, "/invocations", mlflow_bodies),
            spawn(mlflow_command, mlflow_log, mlflow_env),
            "/ping",
            mlflow_log,
            "OMP_NUM_THREADS=1",
            lambda body: float(json.loads(body)["predictions"][0]),
        )
    )
    if mlserver is not None:
        ports = free_ports(3)
        models_dir = write_mlserver_models(work / "mlserver-models", workload.booster, ports)
        mlserver_log = work / "mlserver.log"
        servers.append(
            Server(
                "mlserver",
                Target(
                    "MLServer (LightGBM runtime)",
                    "127.0.0.1",
                    ports[0],
                    f"/v2/models/{MLSERVER_MODEL}/infer",
                    [mlserver_body(row) for row in workload.feature_rows],
                ),
                start_mlserver(mlserver, models_dir, mlserver_log),
                # Not /v2/health/ready: that is true before any model is loaded.
                f"/v2/models/{MLSERVER_MODEL}/ready",
                mlserver_log,
                "OMP_NUM_THREADS=1",
                mlserver_prediction,
            )
        )
    return servers
