"""Benchmark: the scoring service against two servers of the same model's bare booster.

One run, on this machine, loopback only (``make bench-rest`` first builds MLServer's own
environment, ``.venv-mlserver``, then runs this with it)::

    python -m benchmarks.rest --mlserver .venv-mlserver/bin/mlserver \
        --out-json bench.json --out-markdown bench.md

1. A model: ``--model DIR`` (a saved RiskModel), else a shop is simulated (``--days``,
   ``--orders-per-day``, ``--seed``) and a model is trained on it (``--trees`` rounds).
2. Requests: postings open at several moments of the history, each with its own events as the
   seller would send them (the latest ``--events-per-kind`` of each kind known at ``as_of``).
   For the bare servers, the same orders' prebuilt feature rows (the booster's matrix, one row
   each).
3. Servers, each started here as its own process on free 127.0.0.1 ports, one worker each:
   ``cancel-risk serve --model DIR`` (features, probability, reasons, decision);
   ``mlflow models serve`` of the booster saved alone with ``mlflow.lightgbm``; and MLServer's
   LightGBM runtime (``mlserver start``, ``parallel_workers`` 0: inference in the server's own
   process) on the booster saved as text (``--mlserver PATH``; ``--no-mlserver`` leaves it out).
   The two bare servers run with ``OMP_NUM_THREADS=1``; the service sets its own threads. Each
   must answer its readiness route from the process started here (not a stale one on the port)
   and give ``booster.predict``'s answers on rows with missing values before it is measured.
4. Load from this process (not the servers): a minimal asyncio HTTP/1.1 client with keep-alive
   connections. Sequential latency (p50/p95/p99 over ``--sequential`` requests), throughput at
   concurrency 8 and 32 (``--seconds`` each), ``--repeats`` times alternating between the
   servers, medians reported, with the service's figures over each peer's; then
   ``--batch-calls`` calls of ``POST /v1/score/batch`` with ``--batch-size`` postings. Peak
   memory is the serving process's peak resident set (``VmHWM``, the largest process of its
   tree; the tree's total is in the JSON). The targets (sequential p99 <= 2 ms, req/s at c=8 >=
   MLServer's, the batch call <= 0.15 s) are reported met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

API_KEY = "benchmark-key"
CONCURRENCY = (8, 32)
START_TIMEOUT_S = 180


# --- a minimal HTTP/1.1 client -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    path: str
    bodies: list[bytes]
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, body: bytes, path: str | None = None) -> bytes:
        lines = [
            f"POST {path or self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        return status, await reader.readexactly(length)
    body = b""
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    return status, body


class Connection:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)

    async def send(self, payload: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(payload)
        return await _read_response(self.reader)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()


async def _sequential(target: Target, count: int, warmup: int) -> tuple[list[float], int]:
    connection = Connection(target)
    await connection.open()
    payloads = [target.request(body) for body in target.bodies]
    latencies, errors = [], 0
    try:
        for i in range(warmup + count):
            start = time.perf_counter()
            status, _ = await connection.send(payloads[i % len(payloads)])
            elapsed = time.perf_counter() - start
            if i >= warmup:
                latencies.append(elapsed)
                errors += status != 200
    finally:
        await connection.close()
    return latencies, errors


async def _concurrent(target: Target, concurrency: int, seconds: float) -> tuple[float, int, int]:
    """Requests per second over ``seconds`` with ``concurrency`` keep-alive connections."""
    payloads = [target.request(body) for body in target.bodies]
    connections = [Connection(target) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in connections))
    done = errors = 0
    stop_at = 0.0

    async def worker(k: int, connection: Connection, measure: bool) -> None:
        nonlocal done, errors
        i = k
        while time.perf_counter() < stop_at:
            status, _ = await connection.send(payloads[i % len(payloads)])
            i += concurrency
            if measure:
                done += 1
                errors += status != 200

    try:
        stop_at = time.perf_counter() + min(2.0, seconds / 2)  # warm-up, not counted
        await asyncio.gather(*(worker(k, c, False) for k, c in enumerate(connections)))
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker(k, c, True) for k, c in enumerate(connections)))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    return done / elapsed, done, errors


async def _batch_calls(target: Target, body: bytes, calls: int) -> tuple[list[float], int]:
    connection = Connection(target)
    await connection.open()
    payload = target.request(body, "/v1/score/batch")
    latencies, errors = [], 0
    try:
        await connection.send(payload)  # warm-up
        for _ in range(calls):
            start = time.perf_counter()
            status, _ = await connection.send(payload)
            latencies.append(time.perf_counter() - start)
            errors += status != 200
    finally:
        await connection.close()
    return latencies, errors


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all probed at once, so none repeats)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (any address), from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def check_listener(port: int, process: subprocess.Popen) -> None:
    """Fail unless ``port`` is held by ``process`` or one of its children.

    A stale server left on the same port would otherwise answer the readiness probe and be
    measured in place of the one started here.
    """
    inodes = _listening_inodes(port)
    for member in process_tree(process.pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{member}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        return
    raise RuntimeError(
        f"127.0.0.1:{port} is not served by the process started here (pid {process.pid}): "
        "another server holds the port"
    )


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=2) as response,  # noqa: S310 (loopback URL)
        ):
            if response.status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=20)


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(child) for child in task.read_text().split()]
    return pids


def _peak_rss_mb(pid: int) -> tuple[float, float]:
    """(largest process, whole tree) peak resident set in MB, from /proc/<pid>/status VmHWM."""
    peaks = []
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
    return (max(peaks, default=0.0), sum(peaks))


def error_log_lines(log: Path) -> list[str]:
    """Lines of a service's log that report an error (uvicorn's and the service's own)."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line for line in lines if "ERROR" in line or "Traceback" in line]


def spawn(
    command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen:
    """``command`` itself (no shell, so the pid is the server's own) in its own session, its
    output in ``log``, run from ``cwd`` (the log's directory unless given)."""
    with log.open("wb") as output:
        return subprocess.Popen(  # noqa: S603 (our own commands, no shell)
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd or log.parent,
            start_new_session=True,
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


def train_model(work: Path, args: argparse.Namespace, env: dict[str, str]) -> Path:
    """Simulate a shop and train a model with the project's own commands; save it as files.

    Training runs through ``cancel-risk simulate`` and ``cancel-risk train`` (a temporary
    SQLite tracking store), so the benchmark measures the model the project would register.
    """
    from serving.model_store import load_risk_model_from_mlflow

    cli = str(Path(sys.executable).with_name("cancel-risk"))
    history = work / "history"
    config = work / "benchmark_config.yaml"
    config.write_text(
        "lightgbm:\n"
        f"  num_boost_round: {args.trees}\n"
        f"  early_stopping_rounds: {args.trees}\n"
        "  num_leaves: 63\n"
        "  min_data_in_leaf: 20\n",
        encoding="utf-8",
    )
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    train_env = {**env, "MLFLOW_TRACKING_URI": tracking}
    simulate = [cli, "simulate", "--out", str(history), "--days", str(args.days)]
    simulate += ["--orders-per-day", str(args.orders_per_day), "--seed", str(args.seed)]
    train = [cli, "train", "--history", str(history), "--config", str(config)]
    commands = [simulate, [*train, "--promote-if-better"]]
    for command in commands:
        logger.info("running %s", " ".join(command[1:3]))
        subprocess.run(  # noqa: S603 (our own commands, no shell)
            command, cwd=work, env=train_env, check=True, capture_output=True
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    try:
        model = load_risk_model_from_mlflow("models:/cancel-risk@champion")
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return model.save(work / "model")


def model_and_history(
    args: argparse.Namespace, work: Path, env: dict[str, str]
) -> tuple[Path, Path]:
    """The model directory and the history the requests come from: given, or simulated here."""
    if args.model is not None:
        if args.history is None:
            raise SystemExit("--model needs --history (the requests come from a history)")
        return Path(args.model), Path(args.history)
    return train_model(work, args, env), Path(args.history or work / "history")


def build_service_requests(history: Path, count: int, events_per_kind: int) -> list[dict[str, Any]]:
    """About ``count`` score requests: postings open at ten moments of the last 30 days.

    Each is what the seller would send: the posting and the latest ``events_per_kind`` of its
    pushes, prices and scans known at that moment.
    """
    from cancel_risk.examples import latest_moment, load_history_records, open_score_requests

    records = load_history_records(history)
    latest = latest_moment(records)
    requests: list[dict[str, Any]] = []
    for days_back in range(0, 30, 3):
        moment = latest - days_back * 86_400_000_000_000
        requests += open_score_requests(
            records, moment, limit=max(1, count // 10), latest_per_kind=events_per_kind
        )
    if len(requests) < 10:
        raise SystemExit(f"only {len(requests)} open postings found in {history}")
    return requests


def start_service(
    model_dir: Path,
    work: Path,
    env: dict[str, str],
    *,
    api_key: str = API_KEY,
    extra_env: dict[str, str] | None = None,
    log_name: str = "service.log",
) -> tuple[subprocess.Popen, int, Path]:
    """``cancel-risk serve --model DIR`` on a free loopback port, in its own session.

    Returns the process, its port and its log; the caller waits for ``/readyz`` and stops it.
    """
    port = free_port()
    service_env = {
        **env,
        "CANCEL_RISK_API_KEYS": api_key,
        "CANCEL_RISK_MODEL_CACHE_DIR": str(work / "cache"),
        "CANCEL_RISK_MAX_BODY_BYTES": str(256 * 1024 * 1024),
        **(extra_env or {}),
    }
    command = [
        str(Path(sys.executable).with_name("cancel-risk")),
        "serve",
        *("--model", str(model_dir), "--port", str(port)),
    ]
    log = work / log_name
    return spawn(command, log, service_env), port, log


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose (or simulate and train) the model and the requests' history."""
    parser.add_argument("--model", type=Path, help="A saved RiskModel directory (else trained).")
    parser.add_argument("--history", type=Path, help="History the requests come from.")
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--orders-per-day", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--trees", type=int, default=300)
    parser.add_argument("--requests", type=int, default=300, help="Distinct requests to cycle.")
    parser.add_argument("--events-per-kind", type=int, default=10)


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


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class ServerFigures:
    name: str
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: dict[str, float]
    errors: int
    peak_rss_mb: float
    peak_rss_tree_mb: float
    repeats: list[dict[str, Any]] = field(default_factory=list)


def _percentiles(latencies: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)}


async def _measure_once(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    latencies, errors = await _sequential(target, args.sequential, warmup=200)
    figures: dict[str, Any] = {**_percentiles(latencies), "errors": errors, "rps": {}}
    for concurrency in CONCURRENCY:
        rps, _, failed = await _concurrent(target, concurrency, args.seconds)
        figures["rps"][str(concurrency)] = rps
        figures["errors"] += failed
    logger.info("%s: %s", target.name, figures)
    return figures


def _summarise(name: str, repeats: list[dict[str, Any]], pid: int) -> ServerFigures:
    median = statistics.median
    largest, tree = _peak_rss_mb(pid)
    return ServerFigures(
        name=name,
        p50_ms=median(r["p50_ms"] for r in repeats),
        p95_ms=median(r["p95_ms"] for r in repeats),
        p99_ms=median(r["p99_ms"] for r in repeats),
        rps={str(c): median(r["rps"][str(c)] for r in repeats) for c in CONCURRENCY},
        errors=sum(r["errors"] for r in repeats),
        peak_rss_mb=largest,
        peak_rss_tree_mb=tree,
        repeats=repeats,
    )


def tool_environment() -> dict[str, str]:
    """This environment with its interpreter's directory first on PATH (its own commands)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


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


async def _check_answers(
    server: Server, indices: Sequence[int], expected: Sequence[float]
) -> float:
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


def _ratios(service: ServerFigures, peer: ServerFigures) -> dict[str, float]:
    """``cancel-risk serve``'s figure over the peer's: below 1 is faster (latency), above 1
    more requests a second."""
    ratios = {k: getattr(service, k) / getattr(peer, k) for k in ("p50_ms", "p95_ms", "p99_ms")}
    ratios.update({f"rps_c{c}": service.rps[str(c)] / peer.rps[str(c)] for c in CONCURRENCY})
    ratios["peak_rss_mb"] = service.peak_rss_mb / peer.peak_rss_mb
    return ratios


P99_TARGET_MS = 2.0
BATCH_TARGET_S = 0.15


def _check(
    target: str, measured: float, limit: float | None, unit: str, met: bool | None
) -> dict[str, Any]:
    return {"target": target, "measured": measured, "limit": limit, "unit": unit, "met": met}


def target_checks(
    service: dict[str, Any], mlserver: dict[str, Any] | None, batch: dict[str, Any]
) -> list[dict[str, Any]]:
    """The targets: sequential p99 <= 2 ms; req/s at c=8 >= MLServer's; a 1,000-posting batch
    call (the median of the calls) <= 0.15 s. ``met`` is None where it was not measured."""
    p99, rps, batch_s = service["p99_ms"], service["rps"]["8"], batch["median_s"]
    peer = None if mlserver is None else mlserver["rps"]["8"]
    return [
        _check(
            f"sequential p99 <= {P99_TARGET_MS:g} ms",
            p99,
            P99_TARGET_MS,
            "ms",
            p99 <= P99_TARGET_MS,
        ),
        _check(
            "req/s at c=8 >= MLServer's", rps, peer, "req/s", None if peer is None else rps >= peer
        ),
        _check(
            f"batch of {batch['postings']} postings <= {BATCH_TARGET_S:g} s (median call)",
            batch_s,
            BATCH_TARGET_S,
            "s",
            batch_s <= BATCH_TARGET_S,
        ),
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    mlserver = None if args.no_mlserver else find_mlserver(args.mlserver)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cancel-risk-bench-") as tmp:
        work = Path(tmp)
        env = tool_environment()
        workload = prepare(args, work, env)
        servers = start_servers(workload, work, env, mlserver)
        try:
            for server in servers:
                url = f"http://127.0.0.1:{server.target.port}{server.ready_path}"
                wait_ready(url, server.process, server.log)
                check_listener(server.target.port, server.process)
            check_rows = answer_check_rows(workload.feature_rows)
            answers = {
                server.key: {
                    "rows": len(check_rows),
                    "rows_with_missing": sum(
                        any(math.isnan(v) for v in workload.feature_rows[i]) for i in check_rows
                    ),
                    "max_abs_difference": asyncio.run(
                        _check_answers(server, check_rows, workload.expected)
                    ),
                }
                for server in servers
                if server.parse is not None
            }
            # Every server is up (an idle one costs nothing) and the repeats alternate between
            # them, so a change in the machine's load falls on all alike.
            repeats: dict[str, list[dict[str, Any]]] = {server.key: [] for server in servers}
            for _ in range(args.repeats):
                for server in servers:
                    repeats[server.key].append(asyncio.run(_measure_once(server.target, args)))
            items = [workload.requests[i % len(workload.requests)] for i in range(args.batch_size)]
            batch_body = json.dumps({"items": items}, ensure_ascii=False).encode()
            latencies, errors = asyncio.run(
                _batch_calls(servers[0].target, batch_body, args.batch_calls)
            )
            batch = {
                "postings": args.batch_size,
                "calls": args.batch_calls,
                "median_s": statistics.median(latencies),
                "max_s": max(latencies),
                "errors": errors,
                "body_mb": len(batch_body) / 1e6,
            }
            results = {
                server.key: _summarise(server.target.name, repeats[server.key], server.process.pid)
                for server in servers
            }
        finally:
            for server in servers:
                stop_process(server.process)
    service = results["service"]
    peers = {key: figures for key, figures in results.items() if key != "service"}
    figures = {key: asdict(value) for key, value in results.items()}
    return {
        "started": started,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.rest", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        "model": {"trees": workload.trees, "feature_columns": len(workload.feature_columns)},
        "requests": {
            "distinct": len(workload.requests),
            "sequential": args.sequential,
            "seconds_per_concurrency": args.seconds,
            "repeats": args.repeats,
            "mean_events": float(
                np.mean(
                    [
                        len(r["prices"]) + len(r["pushes"]) + len(r["tracking"])
                        for r in workload.requests
                    ]
                )
            ),
            "rows_with_missing_values": sum(
                any(math.isnan(v) for v in row) for row in workload.feature_rows
            ),
        },
        "threads": {server.key: server.threads for server in servers},
        "answers_checked": answers,
        "service": figures["service"],
        "mlflow": figures["mlflow"],
        "mlserver": figures.get("mlserver"),
        "mlserver_skipped": "--no-mlserver" if mlserver is None else None,
        "ratios": {key: _ratios(service, peer) for key, peer in peers.items()},
        "batch": batch,
        "targets": target_checks(figures["service"], figures.get("mlserver"), batch),
    }


def _verdict(check: dict[str, Any]) -> str:
    unit = check["unit"]
    measured = check["measured"]
    digits = 0 if unit == "req/s" else (3 if unit == "s" else 2)
    if check["met"] is None:
        return f"not measured (MLServer not run); {measured:,.{digits}f} {unit}"
    margin = abs(measured - check["limit"])
    word = "met" if check["met"] else "missed"
    if unit == "req/s":
        side = "above" if measured >= check["limit"] else "below"
        return (
            f"**{word}**: {measured:,.0f} against {check['limit']:,.0f} req/s "
            f"({margin:,.0f} {side}, {measured / check['limit']:.2f}x)"
        )
    side = "under" if measured <= check["limit"] else "over"
    return f"**{word}**: {measured:.{digits}f} {unit} ({margin:.{digits}f} {unit} {side} the limit)"


SERVER_LABELS = {
    "service": "`cancel-risk serve` (parse, features, probability, reasons, decision)",
    "mlflow": "`mlflow models serve` (bare booster predict of prebuilt rows)",
    "mlserver": "MLServer LightGBM runtime, `parallel_workers` 0 (bare predict of the same rows)",
}


def format_markdown(report: dict[str, Any]) -> str:
    keys = [k for k in ("service", "mlflow", "mlserver") if report.get(k) is not None]
    rows = [
        "| server | p50 ms | p95 ms | p99 ms | req/s c=8 | req/s c=32 | errors | peak RSS MB "
        "| threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in keys:
        figures = report[key]
        rows.append(
            f"| {SERVER_LABELS[key]} | {figures['p50_ms']:.2f} | {figures['p95_ms']:.2f} | "
            f"{figures['p99_ms']:.2f} | {figures['rps']['8']:.0f} | {figures['rps']['32']:.0f} | "
            f"{figures['errors']} | {figures['peak_rss_mb']:.0f} | {report['threads'][key]} |"
        )
    ratio_rows = [
        "| `cancel-risk serve` / peer | p50 | p95 | p99 | req/s c=8 | req/s c=32 | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, ratios in report["ratios"].items():
        ratio_rows.append(
            f"| {report[key]['name']} | {ratios['p50_ms']:.2f}x | {ratios['p95_ms']:.2f}x | "
            f"{ratios['p99_ms']:.2f}x | {ratios['rps_c8']:.2f}x | {ratios['rps_c32']:.2f}x | "
            f"{ratios['peak_rss_mb']:.2f}x |"
        )
    batch = report["batch"]
    machine = report["machine"]
    skipped = (
        ["MLServer was not run (`--no-mlserver`).", ""] if report.get("mlserver_skipped") else []
    )
    checked = "; ".join(
        f"{report[key]['name']}: {c['rows']} rows ({c['rows_with_missing']} with a missing value), "
        f"largest difference {c['max_abs_difference']:.1g}"
        for key, c in report["answers_checked"].items()
    )
    return "\n".join(
        [
            *rows,
            "",
            *ratio_rows,
            "",
            *skipped,
            "Targets:",
            *(f"- {check['target']}: {_verdict(check)}" for check in report["targets"]),
            "",
            f"Batch of {batch['postings']} postings: median {batch['median_s']:.3f} s, "
            f"max {batch['max_s']:.3f} s over {batch['calls']} calls "
            f"({batch['body_mb']:.1f} MB body), {batch['errors']} errors.",
            f"Answers against `booster.predict` before measuring: {checked}.",
            f"Medians of {report['requests']['repeats']} repeats; {report['model']['trees']}-tree "
            f"model; {report['requests']['distinct']} distinct requests with "
            f"{report['requests']['mean_events']:.0f} events on average "
            f"({report['requests']['rows_with_missing_values']} of their feature rows have a "
            f"missing value); {machine['cpus']} CPUs, load average "
            f"{machine['load_average_before'][0]} before, {machine['load_average_after'][0]} "
            f"after; {report['started']}.",
            f"Command: `{report['command']}`",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sequential", type=int, default=2000)
        parser.add_argument("--seconds", type=float, default=10.0)
        parser.add_argument("--repeats", type=int, default=3)
        parser.add_argument("--batch-size", type=int, default=1000)
        parser.add_argument("--batch-calls", type=int, default=5)
        parser.add_argument(
            "--mlserver",
            type=Path,
            default=DEFAULT_MLSERVER,
            help="MLServer's command, in its own environment (`make bench-rest` creates it).",
        )
        parser.add_argument(
            "--no-mlserver", action="store_true", help="Leave MLServer out (the report says so)."
        )

    run_command(argv, __doc__.splitlines()[0], add_arguments, run, format_markdown)


# --- what the benchmark, the soak and the fuzz share on their command lines --------------------


def run_command(
    argv: list[str] | None,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run_tool: Callable[[argparse.Namespace], dict[str, Any]],
    format_report: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """One of the load tools from its command line: the model options, the tool's own
    (``add_arguments``), where to write the report and ``-v``; then the run and its report."""
    parser = argparse.ArgumentParser(description=description)
    add_model_arguments(parser)
    add_arguments(parser)
    parser.add_argument("--out-json", type=Path, help="Also write the figures to this file.")
    parser.add_argument("--out-markdown", type=Path, help="Also write the table to this file.")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    report = run_tool(args)
    write_outputs(args, report, format_report(report))
    return report


def write_outputs(args: argparse.Namespace, report: dict[str, Any], markdown: str) -> None:
    """The report as JSON and Markdown where asked, and the Markdown on stdout."""
    for path, text in (
        (args.out_json, json.dumps(report, indent=2)),
        (args.out_markdown, markdown),
    ):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(markdown + "\n")


if __name__ == "__main__":
    main()
