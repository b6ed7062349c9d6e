"""Soak: the scoring service under steady load for minutes — failures, latency drift, memory.

One run, on this machine, loopback only::

    python -m benchmarks.soak --duration 300 --concurrency 32 --out-json soak.json

1. A model and a history: ``--model DIR --history DIR``, else a shop is simulated and a model
   trained on it, as :mod:`benchmarks.rest` does (and with its options).
2. Requests: postings open at ten moments of the history, each with its own recent events, as
   a seller's order system sends them; the language of the reasons rotates over en, zh and ru.
3. The service: ``cancel-risk serve --model DIR``, one uvicorn worker, started here as its own
   process on 127.0.0.1; the load comes from this process (a separate one), so the service's
   memory is its own.
4. Load: ``--concurrency`` keep-alive connections send ``POST /v1/score`` back to back, first for
   ``--warmup`` seconds (not measured), then for ``--duration`` seconds. Every request is timed;
   anything but a 200 (a refused connection, a time-out, another status) is a failure. The
   service's resident memory (``VmRSS`` of its process tree, from ``/proc``) is sampled every
   second.

It reports the failures, the p99 latency of the first and of the last ``--window`` seconds, the
memory growth from the start of the measured load to its end, the service's own request counts
(``/metrics``) and the error lines of its log, and checks them against the targets: no failed
request, last-window p99 within ``--max-p99-ratio`` of the first, growth under
``--max-rss-growth``. The exit code is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    API_KEY,
    Connection,
    Target,
    build_service_requests,
    error_log_lines,
    model_and_history,
    process_tree,
    run_command,
    start_service,
    stop_process,
    tool_environment,
    wait_ready,
)

logger = logging.getLogger(__name__)

LANGS = ("en", "zh", "ru")
REQUEST_TIMEOUT_S = 30.0
RSS_SAMPLE_INTERVAL_S = 1.0
_FAILURE_EXAMPLES = 5
_METRIC_LINE = re.compile(
    r'^cancel_risk_http_requests_total\{method="(?P<method>[^"]*)",route="(?P<route>[^"]*)",'
    r'status="(?P<status>[^"]*)"\} (?P<value>[0-9.e+]+)$'
)


@dataclass
class LoadRecord:
    """What the load generator saw: one entry per measured request, and the failures."""

    started: list[float] = field(default_factory=list)  # seconds since the measured start
    latency: list[float] = field(default_factory=list)  # seconds
    ok: list[bool] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    failure_examples: list[str] = field(default_factory=list)
    warmup_requests: int = 0
    warmup_failures: int = 0

    def fail(self, kind: str, example: str) -> None:
        self.failures[kind] += 1
        if len(self.failure_examples) < _FAILURE_EXAMPLES:
            self.failure_examples.append(example[:500])


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children, in MB (``VmRSS`` from ``/proc``)."""
    total_kb = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


async def _sample_rss(pid: int, samples: list[tuple[float, float]], origin: list[float]) -> None:
    """Append (seconds since the measured start, MB) every second until cancelled."""
    while True:
        samples.append((time.perf_counter() - origin[0], rss_mb(pid)))
        await asyncio.sleep(RSS_SAMPLE_INTERVAL_S)


async def drive(
    target: Target,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    service_pid: int,
) -> tuple[LoadRecord, list[tuple[float, float]]]:
    """Send requests on ``concurrency`` connections for ``warmup_s`` + ``duration_s`` seconds.

    A connection that fails is replaced by a new one, so one failure costs one request, and
    every failure is counted. Returns the measured requests and the memory samples.
    """
    payloads = [target.request(body) for body in target.bodies]
    record = LoadRecord()
    origin = [time.perf_counter() + warmup_s]  # the measured start
    measured_end = origin[0] + duration_s
    rss_samples: list[tuple[float, float]] = []

    async def worker(k: int) -> None:
        connection: Connection | None = None
        for i in itertools.count(k, concurrency):
            sent_at = time.perf_counter()
            if sent_at >= measured_end:
                break
            status, detail = 0, ""
            try:
                if connection is None:
                    connection = Connection(target)
                    await asyncio.wait_for(connection.open(), REQUEST_TIMEOUT_S)
                payload = payloads[i % len(payloads)]
                status, body = await asyncio.wait_for(connection.send(payload), REQUEST_TIMEOUT_S)
                detail = body[:300].decode("utf-8", "replace")
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                TimeoutError,
                ValueError,
            ) as exc:
                detail = f"{type(exc).__name__}: {exc}"
                if connection is not None:
                    await connection.close()
                connection = None
            finished_at = time.perf_counter()
            ok = status == 200
            if sent_at < origin[0]:
                record.warmup_requests += 1
                record.warmup_failures += not ok
                continue
            record.started.append(sent_at - origin[0])
            record.latency.append(finished_at - sent_at)
            record.ok.append(ok)
            if not ok:
                kind = f"status {status}" if status else detail.split(":", 1)[0]
                record.fail(kind, f"{kind}: {detail}")
        if connection is not None:
            await connection.close()

    sampler = asyncio.create_task(_sample_rss(service_pid, rss_samples, origin))
    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    rss_samples.append((time.perf_counter() - origin[0], rss_mb(service_pid)))
    return record, [(t, mb) for t, mb in rss_samples if t >= 0]


def _latency_figures(latency: np.ndarray, seconds: float) -> dict[str, float]:
    if latency.size == 0:
        return {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "rps": 0.0}
    ms = latency * 1000
    return {
        "count": int(latency.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "rps": float(latency.size / seconds),
    }


def summarise_load(
    record: LoadRecord,
    rss_samples: list[tuple[float, float]],
    duration_s: float,
    window_s: float,
) -> dict[str, Any]:
    """Failures, latency by window (first, last, and every window in between) and memory."""
    started = np.asarray(record.started)
    latency = np.asarray(record.latency)
    failed = int(len(record.ok) - sum(record.ok))
    first = latency[started < window_s]
    last = latency[started >= duration_s - window_s]
    series = []
    for start in np.arange(0.0, duration_s, window_s):
        chosen = latency[(started >= start) & (started < start + window_s)]
        span = min(window_s, duration_s - start)
        series.append({"start_s": float(start), **_latency_figures(chosen, span)})
    first_figures = _latency_figures(first, window_s)
    last_figures = _latency_figures(last, window_s)
    ratio = last_figures["p99_ms"] / first_figures["p99_ms"] if first.size and last.size else None
    memory = [mb for _, mb in rss_samples]
    rss: dict[str, Any] = {"samples": [[round(t, 1), round(mb, 1)] for t, mb in rss_samples]}
    if memory:
        rss.update(
            start_mb=memory[0],
            end_mb=memory[-1],
            peak_mb=max(memory),
            growth_fraction=(memory[-1] - memory[0]) / memory[0] if memory[0] else None,
        )
    return {
        "requests": {
            "measured": len(record.ok),
            "ok": len(record.ok) - failed,
            "failed": failed,
            "failures_by_kind": dict(record.failures),
            "failure_examples": record.failure_examples,
            "warmup": record.warmup_requests,
            "warmup_failed": record.warmup_failures,
            "rps": len(record.ok) / duration_s,
        },
        "latency": {
            "window_s": window_s,
            "first_window": first_figures,
            "last_window": last_figures,
            "overall": _latency_figures(latency, duration_s),
            "p99_ratio_last_to_first": ratio,
            "series": series,
        },
        "rss": rss,
    }


def server_request_counts(base_url: str) -> dict[str, float]:
    """The service's own count of ``POST /v1/score`` responses by status (from ``/metrics``)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:  # noqa: S310 (loopback URL)
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match and match["route"] == "/v1/score" and match["method"] == "POST":
            counts[match["status"]] = counts.get(match["status"], 0.0) + float(match["value"])
    return counts


def check_targets(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The targets the run missed (empty when it met them all)."""
    missed = []
    requests = report["requests"]
    if requests["failed"] or requests["measured"] == 0:
        missed.append(f"{requests['failed']} failed of {requests['measured']} requests")
    ratio = report["latency"]["p99_ratio_last_to_first"]
    if ratio is None or ratio > args.max_p99_ratio:
        missed.append(f"last-window p99 is {ratio}x the first (limit {args.max_p99_ratio}x)")
    growth = report["rss"].get("growth_fraction")
    if growth is None or growth >= args.max_rss_growth:
        missed.append(f"resident memory grew by {growth} (limit {args.max_rss_growth})")
    client_ok = requests["ok"] + requests["warmup"] - requests["warmup_failed"]
    if report["server"]["by_status"].get("200", 0) != client_ok:
        missed.append(
            f"the service counted {report['server']['by_status']} answers, the client {client_ok} "
            "successes"
        )
    if report["server"]["non_200"]:
        missed.append(f"the service counted non-200 answers: {report['server']['by_status']}")
    if report["server"]["error_log_lines"]:
        missed.append(f"{len(report['server']['error_log_lines'])} error lines in the log")
    return missed


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the service, load it, stop it; the figures and the targets missed."""
    if not 0 < args.window <= args.duration / 2:
        raise SystemExit("--window must be positive and at most half of --duration")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    env = tool_environment()
    with tempfile.TemporaryDirectory(prefix="cancel-risk-soak-") as tmp:
        work = Path(tmp)
        model_dir, history = model_and_history(args, work, env)
        requests = build_service_requests(history, args.requests, args.events_per_kind)
        bodies = [
            json.dumps({**request, "lang": LANGS[i % len(LANGS)]}, ensure_ascii=False).encode()
            for i, request in enumerate(requests)
        ]
        service, port, log = start_service(model_dir, work, env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(f"{base_url}/readyz", service, log)
            target = Target(
                "cancel-risk serve", "127.0.0.1", port, "/v1/score", bodies, {"X-API-Key": API_KEY}
            )
            logger.info(
                "soak: %d connections, %.0f s warm-up, %.0f s measured",
                args.concurrency,
                args.warmup,
                args.duration,
            )
            record, rss_samples = asyncio.run(
                drive(target, args.concurrency, args.warmup, args.duration, service.pid)
            )
            by_status = server_request_counts(base_url)
        finally:
            stop_process(service)
        errors = error_log_lines(log)
    report: dict[str, Any] = {
        "started": started,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.soak", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "distinct_requests": len(bodies),
            "route": "POST /v1/score",
        },
        **summarise_load(record, rss_samples, args.duration, args.window),
        "server": {
            "by_status": by_status,
            "non_200": sum(v for k, v in by_status.items() if k != "200"),
            "error_log_lines": errors[:20],
        },
        "targets": {
            "failed_requests": 0,
            "max_p99_ratio": args.max_p99_ratio,
            "max_rss_growth": args.max_rss_growth,
        },
    }
    report["missed"] = check_targets(report, args)
    report["passed"] = not report["missed"]
    return report


def format_markdown(report: dict[str, Any]) -> str:
    requests, latency, rss = report["requests"], report["latency"], report["rss"]
    first, last = latency["first_window"], latency["last_window"]
    machine, config = report["machine"], report["config"]
    window = f"{latency['window_s']:.0f} s"
    return "\n".join(
        [
            f"Soak of {config['duration_s']:.0f} s at concurrency {config['concurrency']} "
            f"({config['route']}, {config['distinct_requests']} distinct requests, "
            f"{config['warmup_s']:.0f} s warm-up): {requests['measured']:,} requests, "
            f"{requests['failed']} failed, {requests['rps']:.0f} req/s.",
            f"p99 first {window} {first['p99_ms']:.2f} ms, last {window} {last['p99_ms']:.2f} ms "
            f"(ratio {latency['p99_ratio_last_to_first']:.2f}; target <= "
            f"{report['targets']['max_p99_ratio']}); p50 {first['p50_ms']:.2f} / "
            f"{last['p50_ms']:.2f} ms.",
            f"Resident memory {rss.get('start_mb', 0):.0f} MB at the start, "
            f"{rss.get('end_mb', 0):.0f} MB at the end, peak {rss.get('peak_mb', 0):.0f} MB "
            f"(growth {100 * (rss.get('growth_fraction') or 0):.1f} %; target < "
            f"{100 * report['targets']['max_rss_growth']:.0f} %).",
            f"Load average {machine['load_average_before'][0]} before, "
            f"{machine['load_average_after'][0]} after, {machine['cpus']} CPUs; "
            f"{report['started']}. "
            + (
                "All targets met." if report["passed"] else "MISSED: " + "; ".join(report["missed"])
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--duration", type=float, default=300.0, help="Measured seconds.")
        parser.add_argument("--warmup", type=float, default=10.0, help="Unmeasured seconds first.")
        parser.add_argument("--concurrency", type=int, default=32)
        parser.add_argument(
            "--window", type=float, default=60.0, help="Seconds of the first and last windows."
        )
        parser.add_argument("--max-p99-ratio", type=float, default=1.5)
        parser.add_argument("--max-rss-growth", type=float, default=0.10)

    report = run_command(argv, __doc__.splitlines()[0], add_arguments, run, format_markdown)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
