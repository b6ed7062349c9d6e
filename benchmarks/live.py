"""The live mode under load: Ozon's pushes at a sustained rate, and a whole shop replayed.

For each book engine (SQLite, the embedded default; PostgreSQL, a server started here from
Debian's package):

1. **Push answers under load.** ``cancel-risk serve --live`` on loopback, its book seeded with
   the history's posting objects (so the worker has every posting to re-score, and does, while
   the pushes arrive); then the history's pushes in time order, one request each, open loop at
   ``--rate`` per second for ``--seconds`` (a push is due at its slot whether or not earlier
   answers came back, so a slow answer delays the latency of what follows, as it would delay
   Ozon's: no coordinated omission). Latency is from the slot to the last byte of the answer.
2. **Replay throughput.** A fresh book; ``cancel-risk replay --speed 0`` of the whole history
   (every push, price row, scan and posting poll); records per second.

``python -m benchmarks.live --model DIR --history DIR`` (or let it simulate and train a shop),
``--out-json``/``--out-markdown`` for the README's table. Targets: push p99 <= 20 ms at 200/s
for 5 minutes with re-scoring running, on both engines; replay >= 2,000 records/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.harness import (
    API_KEY,
    Connection,
    Target,
    model_and_history,
    run_command,
    start_service,
    stop_process,
    tool_environment,
    wait_ready,
)

logger = logging.getLogger(__name__)

PUSH_PATH = "/v1/ozon/push"
REQUEST_TIMEOUT_S = 30.0
P99_TARGET_MS = 20.0
REPLAY_TARGET = 2000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=200.0, help="Pushes per second.")
    parser.add_argument("--seconds", type=float, default=300.0, help="How long to push.")
    parser.add_argument("--connections", type=int, default=16, help="Keep-alive connections.")
    parser.add_argument(
        "--engines", default="sqlite,postgres", help="Comma-separated: sqlite, postgres."
    )
    parser.add_argument("--skip-replay", action="store_true", help="Only the push load.")


def _get_json(url: str) -> Any:
    request = urllib.request.Request(url, headers={"X-API-Key": API_KEY})  # noqa: S310 (loopback)
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


def _post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(  # noqa: S310 (loopback URL)
        url,
        data=orjson.dumps(body),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


def _history_postings(history: Path) -> list[dict[str, Any]]:
    from cancel_risk.examples import latest_posting_objects, load_history_records

    return list(latest_posting_objects(load_history_records(history)).values())


def _history_pushes(history: Path) -> list[bytes]:
    """The history's pushes in time order (as Ozon sent them), encoded."""
    from live.replay import build_timeline

    return [
        orjson.dumps(record.body)
        for record in build_timeline(history, None)
        if record.kind == "push"
    ]


async def push_at_rate(
    port: int, bodies: list[bytes], rate: float, seconds: float, connections: int
) -> dict[str, Any]:
    """Send ``bodies`` (cycled) open loop at ``rate``/s for ``seconds``; latencies and statuses."""
    target = Target("live", "127.0.0.1", port, PUSH_PATH, bodies)
    count = int(rate * seconds)
    payloads = [target.request(bodies[i % len(bodies)]) for i in range(count)]
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        connection = Connection(target)
        await connection.open()
        idle.put_nowait(connection)
    latencies = np.full(count, np.nan)
    statuses: dict[str, int] = {}
    start = time.perf_counter() + 0.5

    async def one(i: int) -> None:
        slot = start + i / rate
        connection = await idle.get()
        try:
            status, _ = await asyncio.wait_for(connection.send(payloads[i]), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            status = 0
            statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            await connection.close()
            connection = Connection(target)
            await connection.open()
        latencies[i] = time.perf_counter() - slot
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        idle.put_nowait(connection)

    tasks = []
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        await idle.get_nowait().close()
    elapsed = time.perf_counter() - start
    ms = latencies[np.isfinite(latencies)] * 1000
    return {
        "pushes": count,
        "achieved_rate": count / elapsed,
        "statuses": statuses,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


@contextlib.contextmanager
def book_url(engine: str, work: Path) -> Any:
    """A fresh book's URL on ``engine``: a SQLite file, or a database on a server started here."""
    if engine == "sqlite":
        yield f"sqlite:///{work / f'book-{time.monotonic_ns()}.db'}"
        return
    from benchmarks.postgres import create_database, start_postgres

    server = start_postgres()
    try:
        yield create_database(server.url, "bench")
    finally:
        server.stop()


@contextlib.contextmanager
def live_service(model: Path, url: str, work: Path, name: str, env: dict[str, str]) -> Any:
    process, port, log = start_service(
        model,
        work,
        env,
        extra_args=["--live", "--db", url],
        extra_env={"CANCEL_RISK_ADMIN_KEY": API_KEY + "-admin"},
        log_name=f"{name}.log",
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process, log)
        yield port
    finally:
        stop_process(process)


def measure_push_load(
    args: argparse.Namespace, engine: str, model: Path, history: Path, work: Path, env: dict
) -> dict[str, Any]:
    postings = _history_postings(history)
    pushes = _history_pushes(history)
    with (
        book_url(engine, work) as url,
        live_service(model, url, work, f"push-{engine}", env) as port,
    ):
        base = f"http://127.0.0.1:{port}"
        for start in range(0, len(postings), 500):
            _post_json(f"{base}/v1/postings", {"postings": postings[start : start + 500]})
        before = _get_json(f"{base}/v1/live/status")
        figures = asyncio.run(push_at_rate(port, pushes, args.rate, args.seconds, args.connections))
        after = _get_json(f"{base}/v1/live/status")
    figures.update(
        engine=engine,
        postings_seeded=len(postings),
        scores_during_load=after["scores"] - before["scores"],
        pending_after=after["pending"],
    )
    logger.info("push load: %s", figures)
    return figures


def measure_replay(engine: str, model: Path, history: Path, work: Path, env: dict) -> dict:
    from live.replay import replay_history

    with (
        book_url(engine, work) as url,
        live_service(model, url, work, f"replay-{engine}", env) as port,
    ):
        report = replay_history(
            history, f"http://127.0.0.1:{port}", speed=0, api_key=API_KEY, concurrency=16
        )
    figures = {
        "engine": engine,
        "records": report.records_sent,
        "requests": report.requests,
        "seconds": report.elapsed_seconds,
        "records_per_s": report.events_per_second,
        "refused": report.refused,
    }
    logger.info("replay: %s", figures)
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = tool_environment()
    engines = [engine.strip() for engine in args.engines.split(",") if engine.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-live-") as scratch:
        work = Path(scratch)
        model, history = model_and_history(args, work, env)
        pushes = [measure_push_load(args, e, model, history, work, env) for e in engines]
        replays = []
        if not args.skip_replay:
            replays = [measure_replay(e, model, history, work, env) for e in engines]
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "history": str(history),
        "push_load": pushes,
        "replay": replays,
        "targets": {"push_p99_ms": P99_TARGET_MS, "replay_records_per_s": REPLAY_TARGET},
    }


def format_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Pushes at {report['rate']:.0f}/s for {report['seconds']:.0f} s, re-scoring running:",
        "",
        "| book | pushes | achieved /s | p50 ms | p90 ms | p99 ms | max ms | non-200 | "
        "scores meanwhile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["push_load"]:
        bad = sum(n for status, n in row["statuses"].items() if status != "200")
        lines.append(
            f"| {row['engine']} | {row['pushes']:,} | {row['achieved_rate']:.1f} | "
            f"{row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['max_ms']:.1f} | {bad} | {row['scores_during_load']:,} |"
        )
    if report["replay"]:
        lines += [
            "",
            "| book | records replayed | seconds | records/s | refused |",
            "|---|---|---|---|---|",
        ]
        for row in report["replay"]:
            lines.append(
                f"| {row['engine']} | {row['records']:,} | {row['seconds']:.1f} | "
                f"{row['records_per_s']:,.0f} | {row['refused']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    run_command(argv, __doc__.splitlines()[0], add_arguments, run, format_markdown)


if __name__ == "__main__":
    main()
