"""Benchmark of training: throughput on a million posting-snapshots, and quality against the truth.

Run ``python -m benchmarks.training`` (``--help`` for the options). It

1. simulates a shop with ``--truth`` (or reuses the one cached under ``--cache-dir``), on a seed
   that no test or experiment uses, large enough for about a million training moments;
2. measures each stage in one process: loading the history, building the training set (the
   point-in-time features of every moment), fitting (LightGBM with early stopping and the
   calibrator), and scoring the postings open at the export moment — wall time and the peak
   resident memory during the stage (sampled);
3. compares the model with the simulator's true probabilities on the postings open at the
   export moment, with their simulated outcomes: ROC AUC of both, the model's expected
   calibration error (equal-mass bins) and Brier score.

Figures go to stdout as a table and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import pandas as pd

from benchmarks.batch import RssSampler

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("data/bench")
BENCHMARK_SEED = 2027  # used by nothing else: the quality figure is out of sample


class StageClock:
    """Wall time and peak resident memory of named stages, in order."""

    def __init__(self, sampler: RssSampler):
        self.sampler = sampler
        self.stages: dict[str, dict[str, float]] = {}

    def measure(self, name: str, work):
        self.sampler.reset()
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        self.stages[name] = {"seconds": seconds, "peak_rss_gb": self.sampler.reset() / 1e9}
        logger.info("%s: %.1f s", name, seconds)
        return result


def load_or_simulate(cache_dir: Path, days: int, orders_per_day: int, seed: int) -> Path:
    from simulator import SimulationConfig, simulate_shop, write_history

    directory = cache_dir / f"training-{days}d-{orders_per_day}-seed{seed}"
    if (directory / "truth.csv").exists():
        return directory
    world = simulate_shop(
        SimulationConfig(days=days, orders_per_day=orders_per_day, seed=seed), truth=True
    )
    write_history(world, directory, truth=True)
    return directory


def run(history: Path) -> dict:
    from core.ingest import load_history
    from training.config import load_training_config
    from training.dataset import build_training_set, fit_training_aggregates
    from training.evaluate import compute_metrics
    from training.train import fit_cancel_risk_model

    config = load_training_config()
    with RssSampler() as sampler:
        clock = StageClock(sampler)
        tables = clock.measure("load history", lambda: load_history(history))
        as_of = tables.latest_event_at()
        aggregates = clock.measure(
            "learn history aggregates",
            lambda: fit_training_aggregates(tables, as_of, config.snapshots),
        )
        training_set = clock.measure(
            "build features of every moment",
            lambda: build_training_set(tables, as_of, config.snapshots, aggregates=aggregates),
        )
        train_rows = training_set[training_set["split"] == "train"]
        model = clock.measure(
            "fit LightGBM + calibrator",
            lambda: fit_cancel_risk_model(training_set, config, aggregates),
        )
        scored = clock.measure("score open postings", lambda: model.score_tables(tables, as_of))
    truth = pd.read_csv(history / "truth.csv", dtype={"posting_number": str})
    joined = scored.assign(posting_number=scored["posting_number"].astype(str)).merge(
        truth, on="posting_number", how="inner"
    )
    labelled = joined[joined["label"].notna()]
    y = labelled["label"].to_numpy(dtype=int)
    model_metrics = compute_metrics(y, labelled["probability"].to_numpy())
    truth_metrics = compute_metrics(y, labelled["true_probability"].to_numpy())
    return {
        "history": str(history),
        "training_moments": len(training_set),
        "train_rows": len(train_rows),
        "trees": model.booster.num_trees(),
        "stages": clock.stages,
        "open_postings_scored": len(scored),
        "open_postings_with_outcome": len(labelled),
        "model": {k: float(v) for k, v in model_metrics.items()},
        "truth": {k: float(v) for k, v in truth_metrics.items()},
        "load_average": os.getloadavg()[0],
    }


def format_report(report: dict) -> str:
    lines = [
        f"history: {report['history']}",
        f"training moments: {report['training_moments']:,} "
        f"({report['train_rows']:,} in the train split), {report['trees']} trees",
        f"{'stage':<34}{'wall s':>9}{'peak GB':>9}",
    ]
    for name, stage in report["stages"].items():
        lines.append(f"{name:<34}{stage['seconds']:>9.1f}{stage['peak_rss_gb']:>9.2f}")
    model, truth = report["model"], report["truth"]
    lines += [
        f"open postings with an outcome: {report['open_postings_with_outcome']:,}",
        f"ROC AUC   model {model['roc_auc']:.4f}   truth {truth['roc_auc']:.4f}   "
        f"gap {truth['roc_auc'] - model['roc_auc']:.4f}",
        f"ECE       model {model['ece']:.4f}   truth {truth['ece']:.4f}",
        f"Brier     model {model['brier']:.4f}   truth {truth['brier']:.4f}",
        f"load average at the end: {report['load_average']:.1f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=160)
    parser.add_argument("--orders-per-day", type=int, default=550)
    parser.add_argument("--seed", type=int, default=BENCHMARK_SEED)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    history = load_or_simulate(args.cache_dir, args.days, args.orders_per_day, args.seed)
    report = run(history)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
