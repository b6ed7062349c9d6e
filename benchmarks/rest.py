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

The servers and what they are sent are :mod:`benchmarks.rest_servers`; the processes, the HTTP
client and the command line it shares with the soak and the fuzz are :mod:`benchmarks.harness`.
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
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    Connection,
    Target,
    check_listener,
    process_tree,
    run_command,
    stop_process,
    tool_environment,
    wait_ready,
)
from benchmarks.rest_servers import (
    DEFAULT_MLSERVER,
    answer_check_rows,
    check_answers,
    find_mlserver,
    prepare,
    start_servers,
)

logger = logging.getLogger(__name__)

CONCURRENCY = (8, 32)


# --- load --------------------------------------------------------------------------------------


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


def _peak_rss_mb(pid: int) -> tuple[float, float]:
    """(largest process, whole tree) peak resident set in MB, from /proc/<pid>/status VmHWM."""
    peaks = []
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
    return (max(peaks, default=0.0), sum(peaks))


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
                        check_answers(server, check_rows, workload.expected)
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


if __name__ == "__main__":
    main()
