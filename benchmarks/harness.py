"""What the REST benchmark, the soak and the fuzz share: the service under load, and its reach.

- The model and the requests: a saved model, or a shop simulated and a model trained with the
  project's own commands (:func:`model_and_history`); score requests of the postings open at
  moments of the history, as the seller would send them (:func:`build_service_requests`).
- Servers as processes: ``cancel-risk serve`` on a free loopback port in its own session
  (:func:`start_service`), waiting for its readiness route, checking that the process started
  here holds its port, stopping its process group.
- A minimal HTTP/1.1 client with keep-alive connections (:class:`Target`, :class:`Connection`).
- The command line: the model options, where to write the report, ``-v`` (:func:`run_command`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

API_KEY = "benchmark-key"
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


def tool_environment() -> dict[str, str]:
    """This environment with its interpreter's directory first on PATH (its own commands)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# --- the model and the requests ----------------------------------------------------------------


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
    extra_args: list[str] | None = None,
    log_name: str = "service.log",
) -> tuple[subprocess.Popen, int, Path]:
    """``cancel-risk serve --model DIR [extra_args]`` on a free loopback port, in its own session.

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
        *(extra_args or ()),
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
