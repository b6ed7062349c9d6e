"""The calibrators side by side: one booster, four calibrators, the same data, the truth.

Run ``python -m benchmarks.calibration [--shop demo|training|both]`` (``--help`` for the
options). For each shop it

1. simulates the shop with its truth, or reuses the copy cached under ``--cache-dir``: the
   demo's (``cancel-risk simulate --days 120 --orders-per-day 150 --seed 7 --truth``) and the
   training benchmark's (``benchmarks.training``: 160 days × 550 orders a day, seed 2027);
2. builds the training set exactly as ``cancel-risk train`` does (the history cut at its latest
   event, the aggregates learned then, the default configuration) and fits ONE booster;
3. fits every calibrator (:data:`METHODS`) on that booster's scores of the same calibration
   split and measures each on the same rows:

   - the holdout (the test split): equal-mass ECE (``training.evaluate``'s function), Brier,
     log loss, ROC AUC;
   - the postings open at the export moment, against what the simulator says happened next:
     the same four, which is the definition of ``training.evaluate.evaluate_against_truth``
     (the ECE there compares the probabilities with the simulated outcomes, not with the true
     probabilities); and against the true probabilities themselves: ``ECE vs truth``, the
     equal-mass ECE with the bins' mean true probability in place of their observed rate, and
     the mean ``|p - p_true|``; with the smallest and largest probability given;
   - per slice (carrier, region, payment type) on both populations.

The uncalibrated booster and the true probability are measured beside them: the true
probability's ECE against the outcomes is the noise floor of that figure on a finite shop.
Venn-Abers is also fitted with every distinct calibration score as a knot, which shows what
the interpolation between :data:`core.calibration.VENN_ABERS_KNOTS` knots changes.
The calibrator of ``evaluate_against_truth`` (the configured one) is measured by that function
too, as a check that the figures here are the ones training logs. Two diagnostics follow: each
population's observed rate against the booster's mean score (the calibration split is one or
two weeks of postings, and its level is what a calibrator learns), and the same calibrators
refitted on the validation and calibration splits together. ``--sweep-seeds 101,102`` also runs
demo-sized shops on other seeds and summarises them, since one shop cannot tell a better
calibrator from a luckier one.

Figures go to stdout as Markdown tables, with ``--out-json`` / ``--out-markdown`` to files.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from benchmarks.training import BENCHMARK_SEED

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CACHE_DIR = Path("data/bench/calibration")
METHODS = ("isotonic", "sigmoid", "beta", "venn_abers")
VENN_ABERS_ALL_KNOTS = "venn_abers_all_knots"
SLICE_COLUMNS = ("carrier", "region", "payment_type")


@dataclasses.dataclass(frozen=True)
class Shop:
    """A simulated shop and the ECE target on its postings open at the export moment."""

    name: str
    days: int
    orders_per_day: int
    seed: int
    ece_target: float

    @property
    def directory_name(self) -> str:
        return f"{self.name}-{self.days}d-{self.orders_per_day}-seed{self.seed}"


SHOPS = {
    "demo": Shop("demo", days=120, orders_per_day=150, seed=7, ece_target=0.015),
    # benchmarks.training's defaults (--days 160 --orders-per-day 550, its seed).
    "training": Shop(
        "training", days=160, orders_per_day=550, seed=BENCHMARK_SEED, ece_target=0.01
    ),
}


class Clock:
    """Wall time of named stages, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def measure(self, name: str, work: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - start
        logger.info("%s: %.2f s", name, self.seconds[name])
        return result


def load_or_simulate(cache_dir: Path, shop: Shop, resimulate: bool = False) -> Path:
    """The shop's history directory with ``truth.csv``, simulated when not cached."""
    from simulator import SimulationConfig, simulate_shop, write_history

    directory = cache_dir / shop.directory_name
    if (directory / "truth.csv").exists() and not resimulate:
        return directory
    world = simulate_shop(
        SimulationConfig(days=shop.days, orders_per_day=shop.orders_per_day, seed=shop.seed),
        truth=True,
    )
    write_history(world, directory, truth=True)
    return directory


# --- metrics -------------------------------------------------------------------------------


def outcome_metrics(labels: np.ndarray, p: np.ndarray, ece_bins: int) -> dict[str, float]:
    """ECE (equal-mass), Brier, log loss, ROC AUC and the range of ``p`` against outcomes."""
    from training.evaluate import compute_metrics

    metrics = compute_metrics(labels, p, ece_bins=ece_bins)
    return {
        "ece": metrics["ece"],
        "brier": metrics["brier"],
        "log_loss": metrics["log_loss"],
        "roc_auc": metrics["roc_auc"],
        "mean_probability": metrics["mean_probability"],
        "base_rate": metrics["base_rate"],
        "min_probability": float(np.min(p)),
        "max_probability": float(np.max(p)),
        "n": float(len(p)),
    }


def truth_metrics(true_p: np.ndarray, p: np.ndarray, ece_bins: int) -> dict[str, float]:
    """``p`` against the true probabilities: the equal-mass ECE with each bin's mean true
    probability as its observed rate, and the mean absolute difference."""
    from training.evaluate import expected_calibration_error

    return {
        "ece_vs_truth": expected_calibration_error(true_p, p, ece_bins),
        "mean_abs_vs_truth": float(np.mean(np.abs(p - true_p))),
    }


def slice_values(frame: pd.DataFrame, column: str, min_rows: int) -> pd.Series:
    """The slice of each row as text; values with fewer than ``min_rows`` rows pooled as
    ``other`` (as ``training.evaluate.build_slice_values`` pools small carriers)."""
    values = frame[column].astype("string").fillna("unknown")
    counts = values.value_counts()
    return values.where(values.map(counts).ge(min_rows), "other")


def slice_rows(
    frame: pd.DataFrame,
    p: np.ndarray,
    *,
    ece_bins: int,
    min_rows: int,
    true_p: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """ECE per slice value of :data:`SLICE_COLUMNS` (bins shrink with the slice, as in
    ``training.evaluate.compute_slice_metrics``); with ``true_p`` also the ECE vs truth and the
    true probability's own ECE against the outcomes."""
    from training.evaluate import expected_calibration_error

    labels = frame["label"].to_numpy(dtype="int64")
    rows = []
    for column in SLICE_COLUMNS:
        values = slice_values(frame, column, min_rows).reset_index(drop=True)
        for value, positions in values.groupby(values, sort=True).indices.items():
            bins = min(ece_bins, max(2, len(positions) // min_rows))
            row = {
                "slice": column,
                "value": str(value),
                "n": len(positions),
                "base_rate": float(labels[positions].mean()),
                "mean_probability": float(p[positions].mean()),
                "ece": expected_calibration_error(labels[positions], p[positions], bins),
            }
            if true_p is not None:
                row["ece_vs_truth"] = expected_calibration_error(
                    true_p[positions], p[positions], bins
                )
                row["truth_ece"] = expected_calibration_error(
                    labels[positions], true_p[positions], bins
                )
            rows.append(row)
    return rows


# --- one shop ------------------------------------------------------------------------------


def score_open_postings(model, tables, truth: pd.DataFrame) -> pd.DataFrame:
    """Raw booster scores and slice columns of the truth's labelled postings, each scored at
    its ``as_of`` on the whole history (as ``evaluate_against_truth`` scores them)."""
    from core.features import build_features

    labelled = truth[truth["label"].notna()]
    parts = []
    for as_of, group in labelled.groupby("as_of", sort=True):
        features = build_features(tables, pd.Timestamp(as_of), aggregates=model.aggregates)
        scored = pd.DataFrame(
            {
                "posting_number": pd.array(features.index, dtype="string"),
                "raw": model.score_raw(features),
                **{c: features[c].to_numpy() for c in SLICE_COLUMNS},
            }
        )
        parts.append(group.merge(scored, on="posting_number", how="inner"))
    joined = pd.concat(parts, ignore_index=True)
    if len(joined) < len(labelled):
        logger.warning(
            "%d truth postings were not open at their as_of", len(labelled) - len(joined)
        )
    joined["label"] = joined["label"].astype("int64")
    return joined


def run_shop(shop: Shop, cache_dir: Path, chosen: str, resimulate: bool = False) -> dict:
    """Every calibrator of :data:`METHODS` on one booster of ``shop`` (see the module doc)."""
    from core.calibration import VennAbersCalibrator, fit_calibrator
    from core.ingest import load_history
    from training.config import load_training_config
    from training.dataset import build_training_set, fit_training_aggregates, known_at
    from training.evaluate import evaluate_against_truth, load_truth
    from training.train import fit_cancel_risk_model, resolve_as_of

    config = load_training_config()
    evaluation = config.evaluation
    bins, min_rows = evaluation.ece_bins, evaluation.min_slice_rows
    min_p = config.calibration.min_probability
    clock = Clock()
    history = clock.measure(
        "simulate or reuse", lambda: load_or_simulate(cache_dir, shop, resimulate)
    )
    tables = clock.measure("load history", lambda: load_history(history))
    as_of = resolve_as_of(tables, None)
    known = known_at(tables, as_of)

    def training_set_of_known() -> pd.DataFrame:
        aggregates = fit_training_aggregates(known, as_of, config.snapshots)
        frame = build_training_set(known, as_of, config.snapshots, aggregates=aggregates)
        frame.attrs["aggregates"] = aggregates
        return frame

    training_set = clock.measure("build training set", training_set_of_known)
    aggregates = training_set.attrs.pop("aggregates")
    model = clock.measure(
        "fit booster (+ configured calibrator)",
        lambda: fit_cancel_risk_model(training_set, config, aggregates),
    )
    calibration = training_set[training_set["split"] == "calibration"]
    test = training_set[training_set["split"] == "test"]
    raw_calibration = model.score_raw(calibration)
    y_calibration = calibration["label"].to_numpy(dtype="int64")
    raw_test = model.score_raw(test)
    y_test = test["label"].to_numpy(dtype="int64")
    truth = load_truth(history)
    open_frame = clock.measure(
        "score open postings (raw)", lambda: score_open_postings(model, tables, truth)
    )
    raw_open = open_frame["raw"].to_numpy()
    y_open = open_frame["label"].to_numpy()
    true_p = open_frame["true_probability"].to_numpy(dtype="float64")

    def measure(p_test: np.ndarray, p_open: np.ndarray) -> dict[str, Any]:
        return {
            "holdout": outcome_metrics(y_test, p_test, bins),
            "open": {
                **outcome_metrics(y_open, p_open, bins),
                **truth_metrics(true_p, p_open, bins),
            },
        }

    results: dict[str, dict[str, Any]] = {"raw booster": measure(raw_test, raw_open)}
    calibrators = {}
    for method in METHODS:
        calibrator = clock.measure(
            f"fit {method}",
            lambda m=method: fit_calibrator(m, raw_calibration, y_calibration, min_p),
        )
        calibrators[method] = calibrator
        p_test = calibrator.transform(raw_test)
        start = time.perf_counter()
        p_open = calibrator.transform(raw_open)
        transform_us = (time.perf_counter() - start) / max(1, len(raw_open)) * 1e6
        results[method] = {
            **measure(p_test, p_open),
            "fit_seconds": clock.seconds[f"fit {method}"],
            "transform_us_per_row": transform_us,
            "stored_numbers": _stored_numbers(calibrator.to_dict()),
            "slices_holdout": slice_rows(test, p_test, ece_bins=bins, min_rows=min_rows),
            "slices_open": slice_rows(
                open_frame, p_open, ece_bins=bins, min_rows=min_rows, true_p=true_p
            ),
        }
        if method == "venn_abers":
            p0, p1 = calibrator.transform_interval(raw_open)
            results[method]["open"]["mean_interval_width"] = float(np.mean(p1 - p0))
    exact = clock.measure(
        f"fit {VENN_ABERS_ALL_KNOTS}",
        lambda: VennAbersCalibrator.fit(raw_calibration, y_calibration, min_p, max_knots=None),
    )
    p_exact_open = exact.transform(raw_open)
    p_knots_open = calibrators["venn_abers"].transform(raw_open)
    results[VENN_ABERS_ALL_KNOTS] = {
        **measure(exact.transform(raw_test), p_exact_open),
        "fit_seconds": clock.seconds[f"fit {VENN_ABERS_ALL_KNOTS}"],
        "stored_numbers": _stored_numbers(exact.to_dict()),
        "open_abs_difference_to_knots": {
            "max": float(np.max(np.abs(p_exact_open - p_knots_open))),
            "mean": float(np.mean(np.abs(p_exact_open - p_knots_open))),
        },
    }
    results["true probability"] = {
        "open": {
            **outcome_metrics(y_open, true_p, bins),
            **truth_metrics(true_p, true_p, bins),
        }
    }
    # The same calibrators on a larger later slice: the validation and calibration splits.
    later = training_set[training_set["split"].isin(["valid", "calibration"])]
    raw_later = model.score_raw(later)
    y_later = later["label"].to_numpy(dtype="int64")
    on_later = {}
    for method in METHODS:
        calibrator = fit_calibrator(method, raw_later, y_later, min_p)
        on_later[method] = measure(calibrator.transform(raw_test), calibrator.transform(raw_open))
    levels = {
        name: {
            "moments": len(frame),
            "postings": int(frame["posting_number"].nunique()),
            "base_rate": float(frame["label"].mean()),
            "booster_mean": float(raw.mean()),
        }
        for name, frame, raw in (
            ("calibration", calibration, raw_calibration),
            ("test", test, raw_test),
            ("valid + calibration", later, raw_later),
        )
    }
    levels["open at export"] = {
        "moments": len(open_frame),
        "postings": len(open_frame),
        "base_rate": float(y_open.mean()),
        "booster_mean": float(raw_open.mean()),
        "true_mean": float(true_p.mean()),
    }
    check = clock.measure(
        "evaluate_against_truth (configured calibrator)",
        lambda: evaluate_against_truth(model, tables, truth, evaluation),
    )
    configured = config.calibration.method
    return {
        "shop": dataclasses.asdict(shop),
        "history": str(history),
        "truth_sha256": hashlib.sha256((history / "truth.csv").read_bytes()).hexdigest()[:16],
        "as_of": as_of.isoformat(),
        "rows": {
            "training_set": len(training_set),
            "calibration": len(calibration),
            "calibration_positives": int(y_calibration.sum()),
            "test": len(test),
            "open_with_outcome": len(open_frame),
        },
        "trees": model.booster.num_trees(),
        "configured_method": configured,
        "chosen_method": chosen,
        "min_probability": min_p,
        "results": results,
        "fitted_on_valid_and_calibration": on_later,
        "levels": levels,
        "evaluate_against_truth_check": {
            "method": configured,
            "model_ece": check["model_ece"],
            "ece_here": results[configured]["open"]["ece"],
            "n": check["n"],
        },
        "seconds": clock.seconds,
    }


def _stored_numbers(data: dict[str, Any]) -> int:
    return sum(len(v) if isinstance(v, list) else 1 for k, v in data.items() if k != "method")


# --- report --------------------------------------------------------------------------------


def _f(value: float, digits: int = 4) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def format_markdown(report: dict) -> str:
    """Every shop's comparison, ECE targets, per-slice ECE of the chosen calibrator, timings."""
    lines = [
        "# Calibrators compared on one booster",
        "",
        f"`{report['command']}`, {report['date']}",
        "",
    ]
    for shop_report in report["shops"]:
        lines += _shop_markdown(shop_report)
    if report.get("sweep"):
        lines += _sweep_markdown(report["sweep"])
    return "\n".join(lines)


SWEEP_FIGURES = (
    ("holdout", "ece", "holdout ECE"),
    ("open", "ece", "open ECE"),
    ("open", "ece_vs_truth", "open ECE vs truth"),
    ("open", "log_loss", "open log loss"),
)


def summarise_sweep(shop_reports: list[dict]) -> dict[str, Any]:
    """Per calibrator (and the raw booster), the mean of each figure over the swept shops and
    on how many of them it was the lowest."""
    names = ["raw booster", *METHODS]
    summary: dict[str, Any] = {"seeds": [r["shop"]["seed"] for r in shop_reports], "figures": {}}
    for population, key, label in SWEEP_FIGURES:
        values = np.array([[r["results"][n][population][key] for n in names] for r in shop_reports])
        best = np.bincount(values.argmin(axis=1), minlength=len(names))
        summary["figures"][label] = {
            name: {"mean": float(values[:, i].mean()), "lowest_on": int(best[i])}
            for i, name in enumerate(names)
        }
    summary["per_seed"] = {
        str(r["shop"]["seed"]): {
            name: {label: r["results"][name][pop][key] for pop, key, label in SWEEP_FIGURES}
            for name in names
        }
        for r in shop_reports
    }
    summary["truth_ece"] = [r["results"]["true probability"]["open"]["ece"] for r in shop_reports]
    summary["calibration_level_gap"] = [
        r["levels"]["calibration"]["base_rate"] - r["levels"]["calibration"]["booster_mean"]
        for r in shop_reports
    ]
    return summary


def _sweep_markdown(sweep: dict) -> list[str]:
    seeds = ", ".join(str(seed) for seed in sweep["seeds"])
    names = list(next(iter(sweep["figures"].values())))
    lines = [
        f"## Demo-sized shops on seeds {seeds}",
        "",
        "Mean over the shops (in brackets: on how many it was the lowest).",
        "",
        "| figure | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, by_name in sweep["figures"].items():
        cells = [f"{by_name[n]['mean']:.4f} ({by_name[n]['lowest_on']})" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    truth = ", ".join(f"{v:.4f}" for v in sweep["truth_ece"])
    gaps = ", ".join(f"{v:+.4f}" for v in sweep["calibration_level_gap"])
    lines += [
        "",
        f"The true probability's own open ECE per shop: {truth}.",
        f"Calibration split's observed rate minus the booster's mean on it: {gaps}.",
        "",
    ]
    return lines


def _shop_markdown(r: dict) -> list[str]:
    shop, rows = r["shop"], r["rows"]
    target = shop["ece_target"]
    lines = [
        f"## {shop['name']}: {shop['days']} days × {shop['orders_per_day']} orders a day, "
        f"seed {shop['seed']}",
        "",
        f"Booster: {r['trees']} trees. Calibration split {rows['calibration']:,} moments "
        f"({rows['calibration_positives']:,} buyer cancellations); holdout {rows['test']:,} "
        f"moments; {rows['open_with_outcome']:,} postings open at the export moment "
        f"({r['as_of']}) with an outcome. Probabilities bounded to "
        f"[{r['min_probability']}, {1 - r['min_probability']}].",
        "",
        "| calibrator | holdout ECE | holdout Brier | holdout log loss | holdout AUC "
        "| open ECE | open ECE vs truth | open mean abs vs truth | open Brier | open log loss "
        "| open AUC | min p | max p | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in r["results"].items():
        hold = result.get("holdout", {})
        open_ = result["open"]
        lines.append(
            f"| {name} | {_f(hold.get('ece', math.nan))} | {_f(hold.get('brier', math.nan))} "
            f"| {_f(hold.get('log_loss', math.nan))} | {_f(hold.get('roc_auc', math.nan))} "
            f"| {_f(open_['ece'])} | {_f(open_['ece_vs_truth'])} "
            f"| {_f(open_['mean_abs_vs_truth'])} | {_f(open_['brier'])} "
            f"| {_f(open_['log_loss'])} | {_f(open_['roc_auc'])} "
            f"| {_f(open_['min_probability'], 5)} | {_f(open_['max_probability'], 5)} "
            f"| {_f(result.get('fit_seconds', math.nan), 2)} |"
        )
    met = [m for m in METHODS if r["results"][m]["open"]["ece"] <= target]
    floor = r["results"]["true probability"]["open"]["ece"]
    check = r["evaluate_against_truth_check"]
    approx = r["results"][VENN_ABERS_ALL_KNOTS]["open_abs_difference_to_knots"]
    lines += [
        "",
        f"Target: open ECE ≤ {target} (against the outcomes of the postings open at the export "
        f"moment): met by {', '.join(met) if met else 'none'}. The true probability's own ECE "
        f"there is {floor:.4f} (the noise floor of that figure on this shop).",
        f"Check: `evaluate_against_truth` gives the configured {check['method']} an ECE of "
        f"{check['model_ece']:.4f} on {int(check['n']):,} postings (here {check['ece_here']:.4f}).",
        f"Venn-Abers interpolation: against every distinct calibration score as a knot, "
        f"|Δp| on the open postings is {approx['mean']:.5f} on average, {approx['max']:.4f} at "
        f"most; mean width p1 − p0 "
        f"{r['results']['venn_abers']['open']['mean_interval_width']:.4f}.",
        "",
    ]
    lines += _levels_markdown(r)
    lines += _slices_markdown(r)
    lines += ["", "| stage | wall s |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in r["seconds"].items()]
    lines.append("")
    return lines


def _levels_markdown(r: dict) -> list[str]:
    """Base rate against the booster's mean per population, and the calibrators refitted on
    the validation and calibration splits together."""
    lines = [
        "Levels: the observed rate against the booster's mean raw score.",
        "",
        "| population | moments | postings | observed rate | booster mean |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, level in r["levels"].items():
        extra = f" (true mean {level['true_mean']:.4f})" if "true_mean" in level else ""
        lines.append(
            f"| {name} | {level['moments']:,} | {level['postings']:,} "
            f"| {level['base_rate']:.4f}{extra} | {level['booster_mean']:.4f} |"
        )
    lines += [
        "",
        "The same calibrators fitted on the validation and calibration splits together:",
        "",
        "| calibrator | holdout ECE | open ECE | open ECE vs truth | open log loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in r["fitted_on_valid_and_calibration"].items():
        hold, open_ = result["holdout"], result["open"]
        lines.append(
            f"| {name} | {_f(hold['ece'])} | {_f(open_['ece'])} | {_f(open_['ece_vs_truth'])} "
            f"| {_f(open_['log_loss'])} |"
        )
    return [*lines, ""]


def _slices_markdown(r: dict) -> list[str]:
    chosen = r["chosen_method"]
    result = r["results"][chosen]
    holdout = {(row["slice"], row["value"]): row for row in result["slices_holdout"]}
    lines = [
        f"Per slice, {chosen} (holdout: ECE against the labels; open: against the outcomes, "
        "against the true probability, and the true probability's own ECE):",
        "",
        "| slice | value | holdout n | holdout ECE | open n | open ECE | open ECE vs truth "
        "| truth's ECE |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["slices_open"]:
        hold = holdout.get((row["slice"], row["value"]), {})
        lines.append(
            f"| {row['slice']} | {row['value']} | {hold.get('n', '-')} "
            f"| {_f(hold.get('ece', math.nan))} | {row['n']} | {_f(row['ece'])} "
            f"| {_f(row['ece_vs_truth'])} | {_f(row['truth_ece'])} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    from training.config import load_training_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shop", choices=("demo", "training", "both"), default="both")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--resimulate", action="store_true", help="Simulate again even when a copy is cached."
    )
    parser.add_argument(
        "--chosen",
        choices=METHODS,
        help="The calibrator whose per-slice ECE is tabled (default: the configured one).",
    )
    parser.add_argument(
        "--sweep-seeds",
        type=lambda text: [int(seed) for seed in text.split(",") if seed],
        default=[],
        help="Also run demo-sized shops on these seeds (comma-separated) and summarise them.",
    )
    parser.add_argument("--out-json", type=Path, help="Also write the figures to this file.")
    parser.add_argument("--out-markdown", type=Path, help="Also write the tables to this file.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    chosen = args.chosen or load_training_config().calibration.method
    names = ("demo", "training") if args.shop == "both" else (args.shop,)
    started = dt.datetime.now(dt.UTC)
    report = {
        "command": " ".join(["python -m benchmarks.calibration", *(argv or sys.argv[1:])]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "shops": [run_shop(SHOPS[name], args.cache_dir, chosen, args.resimulate) for name in names],
    }
    if args.sweep_seeds:
        swept = [
            run_shop(
                dataclasses.replace(SHOPS["demo"], seed=seed),
                args.cache_dir,
                chosen,
                args.resimulate,
            )
            for seed in args.sweep_seeds
        ]
        report["sweep"] = summarise_sweep(swept)
        report["sweep"]["seconds"] = [sum(r["seconds"].values()) for r in swept]
    markdown = format_markdown(report)
    print(markdown)
    for path, text in (
        (args.out_json, json.dumps(report, indent=2, default=float)),
        (args.out_markdown, markdown),
    ):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
