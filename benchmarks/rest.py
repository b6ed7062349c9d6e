"""Benchmark: the scoring service against ``mlflow models serve`` of the same model's booster.

One run, on this machine, loopback only::

    python -m benchmarks.rest --out-json bench.json --out-markdown bench.md

1. A model: ``--model DIR`` (a saved RiskModel), else a shop is simulated (``--days``,
   ``--orders-per-day``, ``--seed``) and a model is trained on it (``--trees`` rounds).
2. Requests: postings open at several moments of the history, each with its own events as the
   seller would send them (the latest ``--events-per-kind`` of each kind known at ``as_of``).
   For MLflow, the same orders' prebuilt feature rows (the booster's matrix, one row each).
3. Servers, each started here as its own process, one uvicorn worker, on 127.0.0.1:
   ``cancel-risk serve --model DIR`` (features, probability, reasons, decision) and
   ``mlflow models serve`` of the booster saved alone with ``mlflow.lightgbm`` (a bare predict).
4. Load from this process (not the servers): a minimal asyncio HTTP/1.1 client with keep-alive
   connections. Sequential latency (p50/p95/p99 over ``--sequential`` requests), throughput at
   concurrency 8 and 32 (``--seconds`` each), ``--repeats`` times alternating between the two
   servers, medians reported; then ``--batch-calls`` calls of ``POST /v1/score/batch`` with
   ``--batch-size`` postings. Peak memory is the serving process's peak resident set (``VmHWM``,
   the largest process of its tree; the tree's total is in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
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


def spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as output:
        return subprocess.Popen(  # noqa: S603 (our own commands, no shell)
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
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
    from serving.fast_path import build_feature_frame
    from serving.scoring import ModelScorer, ScoreJob

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
    # Missing values travel as NaN literals, which MLflow's JSON reader accepts (null is refused).
    feature_rows = [[float(v) for v in row] for row in matrix]
    return Workload(
        model_dir=Path(model_dir),
        booster_dir=booster_dir,
        requests=requests,
        feature_rows=feature_rows,
        feature_columns=list(model.feature_columns),
        trees=model.booster.num_trees(),
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cancel-risk-bench-") as tmp:
        work = Path(tmp)
        env = tool_environment()
        workload = prepare(args, work, env)
        mlflow_port = free_port()
        mlflow_command = [
            sys.executable,
            *("-m", "mlflow", "models", "serve", "-m", str(workload.booster_dir)),
            *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1"),
        ]
        service_bodies = [json.dumps(r, ensure_ascii=False).encode() for r in workload.requests]
        mlflow_bodies = [
            json.dumps(
                {"dataframe_split": {"columns": workload.feature_columns, "data": [row]}}
            ).encode()
            for row in workload.feature_rows
        ]
        service, service_port, _ = start_service(workload.model_dir, work, env)
        server = spawn(mlflow_command, work / "mlflow.log", env)
        try:
            wait_ready(f"http://127.0.0.1:{service_port}/readyz", service, work / "service.log")
            wait_ready(f"http://127.0.0.1:{mlflow_port}/ping", server, work / "mlflow.log")
            targets = {
                "service": Target(
                    "cancel-risk serve",
                    "127.0.0.1",
                    service_port,
                    "/v1/score",
                    service_bodies,
                    {"X-API-Key": API_KEY},
                ),
                "mlflow": Target(
                    "mlflow models serve", "127.0.0.1", mlflow_port, "/invocations", mlflow_bodies
                ),
            }
            # Both servers are up (an idle one costs nothing) and the repeats alternate, so a
            # change in the machine's load falls on both alike.
            repeats: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for _ in range(args.repeats):
                for name, target in targets.items():
                    repeats[name].append(asyncio.run(_measure_once(target, args)))
            items = [workload.requests[i % len(workload.requests)] for i in range(args.batch_size)]
            batch_body = json.dumps({"items": items}, ensure_ascii=False).encode()
            latencies, errors = asyncio.run(
                _batch_calls(targets["service"], batch_body, args.batch_calls)
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
                "service": _summarise("cancel-risk serve", repeats["service"], service.pid),
                "mlflow": _summarise("mlflow models serve", repeats["mlflow"], server.pid),
            }
        finally:
            stop_process(service)
            stop_process(server)
    service_figures, mlflow_figures = results["service"], results["mlflow"]
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
        },
        "service": asdict(service_figures),
        "mlflow": asdict(mlflow_figures),
        "throughput_ratio_c8": service_figures.rps["8"] / mlflow_figures.rps["8"],
        "batch": batch,
    }


def format_markdown(report: dict[str, Any]) -> str:
    service, mlflow_ = report["service"], report["mlflow"]
    rows = [
        "| server | p50 ms | p95 ms | p99 ms | req/s c=8 | req/s c=32 | errors | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, figures in (
        ("`cancel-risk serve` (parse, features, probability, reasons, decision)", service),
        ("`mlflow models serve` (bare booster predict of prebuilt rows)", mlflow_),
    ):
        rows.append(
            f"| {label} | {figures['p50_ms']:.2f} | {figures['p95_ms']:.2f} | "
            f"{figures['p99_ms']:.2f} | {figures['rps']['8']:.0f} | {figures['rps']['32']:.0f} | "
            f"{figures['errors']} | {figures['peak_rss_mb']:.0f} |"
        )
    batch = report["batch"]
    machine = report["machine"]
    return "\n".join(
        [
            *rows,
            "",
            f"Throughput at concurrency 8: {report['throughput_ratio_c8']:.1f}x MLflow's. "
            f"Batch of {batch['postings']} postings: median {batch['median_s']:.3f} s, "
            f"max {batch['max_s']:.3f} s over {batch['calls']} calls.",
            f"Medians of {report['requests']['repeats']} repeats; {report['model']['trees']}-tree "
            f"model; {report['requests']['distinct']} distinct requests with "
            f"{report['requests']['mean_events']:.0f} events on average; "
            f"{machine['cpus']} CPUs, load average {machine['load_average_before'][0]} before, "
            f"{machine['load_average_after'][0]} after; {report['started']}.",
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
