"""What the live mode's end-to-end tests share: the service as a process, and an alert sink.

:class:`LiveService` runs ``cancel-risk serve --live`` (real uvicorn, its worker process beside
it) on a free loopback port in its own session, and stops it gently or with ``kill -9`` of the
whole group. :class:`AlertInbox` (the demo's, from :mod:`cancel_risk.live_demo`) is a
real HTTP server on loopback recording every alert the service's webhook channel delivers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import free_port, spawn, stop_process, wait_ready
from cancel_risk.live_demo import AlertInbox

__all__ = ["ADMIN", "CLI", "KEY", "AlertInbox", "LiveService", "run_cli", "running"]

KEY = "live-scoring-key"
ADMIN = "live-admin-key"
CLI = Path(sys.executable).with_name("cancel-risk")


@dataclass
class LiveService:
    """``cancel-risk serve --live`` of ``model_dir`` on the book at ``db_url``."""

    model_dir: Path
    db_url: str
    work: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.work / f"service-{self.starts}.log"

    def start(self) -> LiveService:
        self.starts += 1
        self.port = free_port()
        env = {
            **os.environ,
            "CANCEL_RISK_API_KEYS": KEY,
            "CANCEL_RISK_ADMIN_KEY": ADMIN,
            "CANCEL_RISK_MODEL_CACHE_DIR": str(self.work / "model-cache"),
            "CANCEL_RISK_CLOCK": "events",
            "CANCEL_RISK_RESCORE_INTERVAL_SECONDS": "0.05",
            **self.env,
        }
        command = [str(CLI), "serve", "--port", str(self.port), "--model", str(self.model_dir)]
        command += ["--db", self.db_url]
        self.work.mkdir(parents=True, exist_ok=True)
        self.process = spawn(command, self.log, env, cwd=self.work)
        wait_ready(f"{self.url}/readyz", self.process, self.log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def kill(self) -> None:
        """``kill -9`` of the server and its worker: no shutdown of any kind."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=20)
        self.process = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": KEY}, timeout=60)

    def status(self) -> dict[str, Any]:
        with self.client() as client:
            return client.get("/v1/live/status").raise_for_status().json()

    def wait_idle(self, timeout: float = 240.0) -> dict[str, Any]:
        """Wait until no posting waits for re-scoring and no alert for delivery."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["pending"] == 0 and status["alerts_unsent"] == 0:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"the book is not idle after {timeout} s: {status}")
            time.sleep(0.2)

    def sweep(self, timeout: float = 240.0) -> dict[str, Any]:
        """Ask for a sweep and wait until it ran at the book's clock and nothing waits."""
        with httpx.Client(base_url=self.url, headers={"X-API-Key": ADMIN}) as client:
            requested = client.post("/v1/live/sweep").raise_for_status().json()["requested"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.wait_idle(timeout)
            if status["sweep_done"] == requested:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"no sweep at the clock after {timeout} s: {status}")
            time.sleep(0.2)

    def open_postings(self) -> dict[str, dict[str, Any]]:
        """Every open posting's latest score, by posting number (all pages)."""
        found: dict[str, dict[str, Any]] = {}
        after = None
        with self.client() as client:
            while True:
                params: dict[str, Any] = {"limit": 1000}
                if after is not None:
                    params["after"] = after
                page = client.get("/v1/postings", params=params).raise_for_status().json()
                found.update({row["posting_number"]: row for row in page["postings"]})
                after = page["next_after"]
                if after is None:
                    return found


@contextlib.contextmanager
def running(service: LiveService) -> Iterator[LiveService]:
    service.start()
    try:
        yield service
    finally:
        service.stop()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [str(CLI), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"cancel-risk {' '.join(args)} exited with {completed.returncode}:\n"
            f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        )
    return completed
