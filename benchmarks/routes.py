"""What one posting's feature row costs by each route, and the point-in-time primitive underneath.

Run ``python -m benchmarks.routes --history DIR --model URI`` (a trained model and a history,
e.g. ``make demo``'s). For ``--requests`` postings open at the history's latest order time, each
sent as the seller's system would send it (:func:`cancel_risk.examples.open_score_requests`),
it measures per request, in this process, medians of ``--repeats`` passes:

- ``prepare_fast``: the checks of a canonical request by the request lane
  (``serving.request_lane``), its parsing alone, and the one feature definition
  (``build_feature_columns``) on its columns, for one request and for all of them in one
  pass, as a micro-batch of concurrent requests or a batch call does it;
- ``prepare_reference``: ``tables_from_objects`` + ``build_features``, the batch's code on the
  request's records, split into its two halves;
- ``score``: probability, level and reasons of one row whose features are computed.

Then ``latest_row`` ("the latest row of each key at t") by its three algorithms on tables and
queries of growing size: every query compared with every row
(:func:`core.point_in_time.latest_by_comparison`), the sorted index
(:class:`core.point_in_time.PointInTimeIndex`) and ``pd.merge_asof``: the figures behind the
switch-over sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import core.point_in_time as point_in_time
from cancel_risk.examples import latest_moment, load_history_records, open_score_requests
from core.features import build_features
from core.ingest import tables_from_objects
from core.model import RiskModel
from core.pyfunc import load_risk_model
from serving.request_lane import parse_request
from serving.scoring import ModelScorer, ScoreJob, complete_rows

LATEST_ROW_SIZES = ((20, 1), (200, 5), (2_000, 200), (10_000, 5_000), (50_000, 50_000))
# The comparison of every query with every row is timed only up to this many pairs (its memory
# grows with their product).
COMPARISON_MAX_PAIRS = 1_000_000


def _per_call_ms(work: Callable[[Any], object], items: Sequence[Any]) -> list[float]:
    times = []
    for item in items:
        start = time.perf_counter()
        work(item)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _summary(passes: list[list[float]]) -> dict[str, float]:
    """Median over passes of each pass's p50 and p99, in ms."""
    return {
        "p50_ms": statistics.median(float(np.percentile(p, 50)) for p in passes),
        "p99_ms": statistics.median(float(np.percentile(p, 99)) for p in passes),
    }


def measure_routes(
    history: str, model_uri: str, requests: int, repeats: int
) -> dict[str, dict[str, float]]:
    saved = Path(model_uri)
    model = (
        RiskModel.load(saved) if (saved / "model.json").is_file() else load_risk_model(model_uri)
    )
    records = load_history_records(history)
    as_of = latest_moment(records)
    bodies = open_score_requests(records, as_of, limit=requests)
    jobs = [
        ScoreJob(b["posting"], b["pushes"], b["prices"], b["tracking"], as_of, "en") for b in bodies
    ]
    scorer = ModelScorer(model)
    moment = pd.Timestamp(as_of, tz="UTC")
    tables = [
        tables_from_objects([j.posting], pushes=j.pushes, prices=j.prices, tracking=j.tracking)
        for j in jobs
    ]
    prepared = [scorer.prepare_fast(job, as_of, ()) for job in jobs]
    complete_rows(prepared)

    def waiting(ready: Sequence[Any]) -> list[Any]:
        return [replace(p, features=None) for p in ready]

    routes: dict[str, Callable[[Any], object]] = {
        "prepare_fast (checks, features to come)": lambda job: scorer.prepare_fast(job, as_of, ()),
        "prepare_fast: parse_request": lambda j: parse_request(
            j.posting, j.pushes, j.prices, j.tracking
        ),
        "features of one request": lambda p: complete_rows(waiting([p])),
        "features of all requests in one pass": lambda ps: complete_rows(waiting(ps)),
        "prepare_reference": lambda job: scorer.prepare_reference(job, as_of, ()),
        "prepare_reference: tables_from_objects": lambda j: tables_from_objects(
            [j.posting], pushes=j.pushes, prices=j.prices, tracking=j.tracking
        ),
        "prepare_reference: build_features": lambda t: build_features(t, moment, model.aggregates),
        "score (one row)": lambda p: scorer.score([replace(p, features=dict(p.features))]),
    }
    inputs = {
        "prepare_fast (checks, features to come)": jobs,
        "prepare_fast: parse_request": jobs,
        "features of one request": prepared,
        "features of all requests in one pass": [prepared],
        "prepare_reference": jobs,
        "prepare_reference: tables_from_objects": jobs,
        "prepare_reference: build_features": tables,
        "score (one row)": prepared,
    }
    # The reference route costs a hundred times more: it is timed on a tenth of the requests.
    slow = {
        "prepare_reference",
        "prepare_reference: tables_from_objects",
        "prepare_reference: build_features",
    }
    report = {}
    for name, work in routes.items():
        items = inputs[name][: max(1, len(jobs) // 10)] if name in slow else inputs[name]
        work(items[0])  # warm caches (timestamp parser, indexes)
        report[name] = _summary([_per_call_ms(work, items) for _ in range(repeats)])
    return report


def measure_latest_row(
    repeats: int, sizes: Sequence[tuple[int, int]] = LATEST_ROW_SIZES, seed: int = 3
) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    report = {}
    for n_table, n_queries in sizes:
        keys = rng.integers(0, 5, n_table)
        times = rng.integers(0, 10**12, n_table)
        query_keys = rng.integers(0, 5, n_queries)
        query_times = rng.integers(0, 10**12, n_queries)
        by_index = _LatestRowTimer(keys, times, query_keys, query_times)
        report[f"{n_table:,} rows, {n_queries:,} queries"] = {
            "comparison_ms": statistics.median(by_index.comparison() for _ in range(repeats))
            if n_table * n_queries <= COMPARISON_MAX_PAIRS
            else float("nan"),
            "sorted_index_ms": statistics.median(by_index.sorted_index() for _ in range(repeats)),
            "merge_asof_ms": statistics.median(by_index.merge_asof() for _ in range(repeats)),
        }
    return report


class _LatestRowTimer:
    """``latest_row`` on one input by each algorithm (the switch-over sizes set per call)."""

    def __init__(self, *arrays: np.ndarray) -> None:
        self.arrays = arrays

    def _timed(self, tiny_pairs: int, small_size: int) -> float:
        saved = point_in_time.TINY_LOOKUP_PAIRS, point_in_time.SMALL_LOOKUP_SIZE
        point_in_time.TINY_LOOKUP_PAIRS, point_in_time.SMALL_LOOKUP_SIZE = tiny_pairs, small_size
        try:
            calls = 0
            start = time.perf_counter()
            while calls < 20 or time.perf_counter() - start < 0.2:
                point_in_time.latest_row(*self.arrays)
                calls += 1
            return (time.perf_counter() - start) / calls * 1e3
        finally:
            point_in_time.TINY_LOOKUP_PAIRS, point_in_time.SMALL_LOOKUP_SIZE = saved

    def comparison(self) -> float:
        return self._timed(2**62, -1)

    def sorted_index(self) -> float:
        return self._timed(-1, 2**62)

    def merge_asof(self) -> float:
        return self._timed(-1, -1)


def format_report(routes: dict[str, dict[str, float]], latest: dict[str, dict[str, float]]) -> str:
    lines = ["| one posting | p50 ms | p99 ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} |" for name, v in routes.items()]
    lines += [
        "",
        "| latest_row | comparison ms | sorted index ms | merge_asof ms |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {size} | {v['comparison_ms']:.3f} | {v['sorted_index_ms']:.3f} |"
        f" {v['merge_asof_ms']:.3f} |"
        for size, v in latest.items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", required=True)
    parser.add_argument(
        "--model", default="models:/cancel-risk@champion", help="A model URI or a saved model."
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    routes = measure_routes(args.history, args.model, args.requests, args.repeats)
    print(format_report(routes, measure_latest_row(args.repeats)))


if __name__ == "__main__":
    main()
