"""Benchmark of the nightly batch: ~1,000,000 open postings scored end to end on this machine.

Run ``python -m benchmarks.batch`` (``--help`` for the options). It

1. simulates an export in which about ``--open-postings`` postings are open at the export
   moment (many orders a day over few days), or reuses the one cached under ``--cache-dir``
   (``data/bench/``, git-ignored);
2. trains a model on a separate simulated shop with the default training configuration (no
   MLflow), or reuses the cached one, or takes ``--model``;
3. runs ``cancel-risk score``'s code (:func:`batch.run_batch`) ``--repeats`` times,
   each in a fresh process, and reports per stage the wall time (median of the repeats) and
   the peak resident memory (highest of the repeats), and the same for the whole run;
4. in one more fresh process, measures the floor on the same feature matrix: LightGBM's own
   ``Booster.predict``, and ``mlflow.pyfunc`` predict of the same booster logged with MLflow's
   LightGBM flavour (medians of ``--floor-repeats``).

Stage peaks come from sampling the resident set of the process and its scoring workers
(``--workers``) together every few milliseconds; the whole run's peak is the highest of those
and the kernel's high-water mark of the process. The figures go to stdout as a table and, with
``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from batch.progress import Progress

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("data/bench")
# The simulator places ~1.078 orders per nominal order a day, ~99 % still open after 3 days.
ORDERS_PER_OPEN_POSTING = 1.078
# The model is trained on the 120 days before the export begins (the simulator's default start,
# 2026-06-01), as a shop's own model is trained on its past: the rates it learned are then the
# ones in force when the export's postings are scored, not those of a shop just opened.
MODEL_SHOP = {"days": 120, "orders_per_day": 150, "seed": 7, "start": "2026-02-01T00:00:00Z"}
_SAMPLE_SECONDS = 0.005


# --- memory --------------------------------------------------------------------------------


def _rss_bytes() -> int:
    """The resident set of this process and of its descendants (scoring workers) together."""
    total, pending = 0, [os.getpid()]
    while pending:
        pid = pending.pop()
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_bytes().split()[1])
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        except (OSError, ValueError):  # it ended while being read
            continue
        total += resident * os.sysconf("SC_PAGE_SIZE")
        pending += children
    return total


def _peak_rss_bytes() -> int:
    """The process's resident high-water mark (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples the resident set in a thread; :meth:`reset` starts a new peak."""

    def __init__(self, every_seconds: float = _SAMPLE_SECONDS):
        self._every = every_seconds
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self._every)

    def reset(self) -> int:
        """The peak since the last reset (including now), and start a new one."""
        peak = max(self._peak, _rss_bytes())
        self._peak = _rss_bytes()
        return peak


# --- the export and the model --------------------------------------------------------------


def build_export_config(open_postings: int, days: int, seed: int) -> dict[str, int]:
    orders_per_day = math.ceil(open_postings / (days * ORDERS_PER_OPEN_POSTING))
    return {"days": days, "orders_per_day": orders_per_day, "seed": seed}


def load_or_simulate_export(cache_dir: Path, config: dict[str, int]) -> tuple[Path, dict]:
    """The cached export for ``config``, simulated (and timed) when missing."""
    from simulator import SimulationConfig, simulate_shop, write_history

    name = f"export-d{config['days']}-o{config['orders_per_day']}-s{config['seed']}"
    directory = cache_dir / name
    marker = directory / "export.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("config") == config:
            logger.info("reusing the export in %s", directory)
            return directory / "history", info
    logger.info("simulating %s (a few minutes for a million postings)", config)
    started = time.perf_counter()
    world = simulate_shop(SimulationConfig(**config))
    simulated = time.perf_counter() - started
    history = directory / "history"
    written = write_history(world, history)
    info = {
        "config": config,
        "simulate_seconds": round(simulated, 1),
        "simulate_and_write_seconds": round(time.perf_counter() - started, 1),
        "simulate_peak_rss_gb": round(_peak_rss_bytes() / 1e9, 2),
        "bytes": {path.name: path.stat().st_size for path in written},
    }
    marker.write_text(json.dumps(info, indent=2))
    return history, info


def load_or_train_model(cache_dir: Path) -> Path:
    """A model trained with the default configuration on a separate simulated shop (cached)."""
    from core.features import FEATURE_VERSION
    from core.ingest import load_history
    from simulator import SimulationConfig, simulate_shop, write_history
    from training.config import load_training_config
    from training.dataset import build_training_set, fit_training_aggregates
    from training.train import fit_cancel_risk_model

    # The feature version is in the name: a model of older features cannot score this code's.
    name = "model-f{version}-d{days}-o{orders_per_day}-s{seed}-{start:.10}".format(
        version=FEATURE_VERSION, **MODEL_SHOP
    )
    model_dir = cache_dir / name / "model"
    if (model_dir / "model.json").is_file():
        return model_dir
    logger.info("training the benchmark model on a simulated shop %s", MODEL_SHOP)
    history = cache_dir / name / "history"
    write_history(simulate_shop(SimulationConfig(**MODEL_SHOP)), history)
    tables = load_history(history)
    as_of = tables.latest_event_at()
    config = load_training_config()
    training_set = build_training_set(tables, as_of, config.snapshots)
    model = fit_cancel_risk_model(
        training_set, config, fit_training_aggregates(tables, as_of, config.snapshots)
    )
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as staging:
        saved = model.save(Path(staging) / "model")
        saved.rename(model_dir)
    return model_dir


# --- workers (each in a fresh process) -----------------------------------------------------


class StageRecorder(Progress):
    """Progress that records each stage's wall time and peak resident memory."""

    def __init__(self, sampler: RssSampler):
        self._sampler = sampler
        self.stages: dict[str, dict[str, float]] = {}
        self._current: tuple[str, float] | None = None

    def begin(self, stage: str, total: int | None = None) -> None:
        self._sampler.reset()
        self._current = (stage, time.perf_counter())

    def end(self) -> None:
        if self._current is None:
            return
        stage, started = self._current
        self.stages[stage] = {
            "seconds": time.perf_counter() - started,
            "peak_rss_gb": self._sampler.reset() / 1e9,
        }
        self._current = None


def run_end_to_end(
    history: Path, model_dir: Path, out: Path, chunk_rows: int, lang: str, workers: int
) -> dict:
    """One timed ``cancel-risk score`` run (model loading excluded, as a server would cache it)."""
    from batch import ScoringOptions, load_scoring_model, run_batch

    model = load_scoring_model(str(model_dir))
    with RssSampler() as sampler:
        recorder = StageRecorder(sampler)
        started = time.perf_counter()
        result = run_batch(
            history,
            out,
            model=model,
            options=ScoringOptions(lang=lang, chunk_rows=chunk_rows, workers=workers),
            progress=recorder,
        )
        total = time.perf_counter() - started
    return {
        "seconds": total,
        # Sampled stage peaks count the scoring workers too; the kernel's mark only this process.
        "peak_rss_gb": max(
            _peak_rss_bytes() / 1e9, *(stage["peak_rss_gb"] for stage in recorder.stages.values())
        ),
        "stages": recorder.stages,
        "steps": result.seconds,
        "postings": result.summary["postings"],
        "risk_levels": result.summary["risk_levels"],
        "output_bytes": result.paths.scores.stat().st_size,
    }


def run_floor(history: Path, model_dir: Path, repeats: int) -> dict:
    """LightGBM's and mlflow.pyfunc's predict on the prebuilt matrix of the same postings."""
    import mlflow.lightgbm
    import mlflow.pyfunc
    import pandas as pd

    from batch.scoring import resolve_as_of
    from core.features import build_features
    from core.ingest import load_history
    from core.model import RiskModel

    model = RiskModel.load(model_dir)
    tables = load_history(history)
    features = build_features(tables, resolve_as_of(tables, None), aggregates=model.aggregates)
    del tables
    matrix = model.build_matrix(features)
    frame = pd.DataFrame(matrix, columns=list(model.feature_columns))
    del features

    def timed(predict) -> tuple[float, float]:
        runs = []
        peak_before = _rss_bytes()
        with RssSampler() as sampler:
            for _ in range(repeats):
                started = time.perf_counter()
                predict()
                runs.append(time.perf_counter() - started)
            peak = sampler.reset()
        return statistics.median(runs), (peak - peak_before) / 1e9

    booster_seconds, booster_extra = timed(lambda: model.booster.predict(matrix))
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.lightgbm.save_model(model.booster, f"{tmp}/booster")
        pyfunc = mlflow.pyfunc.load_model(f"{tmp}/booster")
        pyfunc_seconds, pyfunc_extra = timed(lambda: pyfunc.predict(frame))
    return {
        "rows": int(matrix.shape[0]),
        "trees": int(model.booster.num_trees()),
        "lightgbm_predict_seconds": booster_seconds,
        "lightgbm_predict_extra_rss_gb": booster_extra,
        "pyfunc_predict_seconds": pyfunc_seconds,
        "pyfunc_predict_extra_rss_gb": pyfunc_extra,
    }


def _run_worker(args: list[str]) -> dict:
    """Run this module as a worker in a fresh interpreter and read its JSON result."""
    command = [sys.executable, "-m", "benchmarks.batch", "--worker", *args]
    completed = subprocess.run(  # noqa: S603 (this module in this interpreter, no shell)
        command, check=True, capture_output=True, text=True
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- report --------------------------------------------------------------------------------


def summarise(
    runs: list[dict], floor: dict, export: dict, load_average: float, workers: int = 1
) -> dict:
    stages = list(runs[0]["stages"])
    steps = sorted({step for run in runs for step in run["steps"]})
    rows = runs[0]["postings"]["scored"]
    median_total = statistics.median(run["seconds"] for run in runs)
    return {
        "open_postings_scored": rows,
        "postings_read": runs[0]["postings"]["read"],
        "risk_levels": runs[0]["risk_levels"],
        "repeats": len(runs),
        "load_average_at_start": load_average,
        "cpus": os.cpu_count(),
        "export": export,
        "end_to_end_seconds": median_total,
        "end_to_end_seconds_per_run": [round(run["seconds"], 2) for run in runs],
        "end_to_end_peak_rss_gb": max(run["peak_rss_gb"] for run in runs),
        "workers": workers,
        "stages": {
            stage: {
                "seconds": statistics.median(run["stages"][stage]["seconds"] for run in runs),
                "peak_rss_gb": max(run["stages"][stage]["peak_rss_gb"] for run in runs),
            }
            for stage in stages
        },
        "steps_seconds": {
            step: statistics.median(run["steps"].get(step, 0.0) for run in runs) for step in steps
        },
        "floor": floor,
        "output_bytes": runs[0]["output_bytes"],
        "rows_per_second_end_to_end": rows / median_total if median_total else None,
    }


def format_report(report: dict) -> str:
    floor = report["floor"]
    rows = report["open_postings_scored"]
    lines = [
        f"open postings scored: {rows:,} (of {report['postings_read']:,} read); "
        f"risk levels {report['risk_levels']}",
        f"machine: {report['cpus']} cpus, load average {report['load_average_at_start']:.2f} "
        f"at start; medians of {report['repeats']} runs, peaks are the highest",
        "",
        f"{'stage':<34}{'wall s':>10}{'s per 1M':>10}{'peak RSS GB':>13}",
    ]

    def line(name: str, seconds: float, peak: float | None) -> str:
        per_million = seconds * 1e6 / rows if rows else float("nan")
        peak_text = f"{peak:>13.2f}" if peak is not None else f"{'':>13}"
        return f"{name:<34}{seconds:>10.1f}{per_million:>10.1f}{peak_text}"

    for stage, values in report["stages"].items():
        lines.append(line(stage, values["seconds"], values["peak_rss_gb"]))
    for step in ("features", "predict", "explain", "format", "write"):
        if step in report["steps_seconds"]:
            lines.append(line(f"  step: {step}", report["steps_seconds"][step], None))
    lines.append(line("end to end", report["end_to_end_seconds"], report["end_to_end_peak_rss_gb"]))
    lines += [
        "",
        f"floor on the same {floor['rows']:,}-row matrix ({floor['trees']} trees):",
        line("  LightGBM Booster.predict", floor["lightgbm_predict_seconds"], None)
        + f"   {floor['rows'] / floor['lightgbm_predict_seconds']:,.0f} rows/s",
        line("  mlflow.pyfunc predict", floor["pyfunc_predict_seconds"], None)
        + f"   {floor['rows'] / floor['pyfunc_predict_seconds']:,.0f} rows/s",
        f"end to end: {report['end_to_end_seconds_per_run']} s per run",
    ]
    if report["workers"] > 1:
        lines.append(
            f"{report['workers']} scoring workers: peaks include them, step times are summed "
            "over them"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch",
        description="Benchmark cancel-risk score on ~1M open postings (see the module docstring).",
    )
    parser.add_argument("--open-postings", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=3, help="Simulated days of orders.")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3, help="End-to-end runs.")
    parser.add_argument("--floor-repeats", type=int, default=5)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--lang", default="en")
    parser.add_argument("--workers", type=int, default=1, help="cancel-risk score --workers.")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--model", type=Path, help="A saved RiskModel directory to use.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _worker_main(args: list[str]) -> None:
    kind, *rest = args
    if kind == "e2e":
        history, model_dir, out, chunk_rows, lang, workers = rest
        result = run_end_to_end(
            Path(history), Path(model_dir), Path(out), int(chunk_rows), lang, int(workers)
        )
    elif kind == "floor":
        history, model_dir, repeats = rest
        result = run_floor(Path(history), Path(model_dir), int(repeats))
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cache_dir = args.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    history, export = load_or_simulate_export(
        cache_dir, build_export_config(args.open_postings, args.days, args.seed)
    )
    model_dir = args.model or load_or_train_model(cache_dir)
    load_average = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(dir=cache_dir) as out_dir:
        out = Path(out_dir) / "scores.parquet"
        for repeat in range(args.repeats):
            logger.info("end-to-end run %d of %d", repeat + 1, args.repeats)
            runs.append(
                _run_worker(
                    [
                        *("e2e", str(history), str(model_dir), str(out)),
                        *(str(args.chunk_rows), args.lang, str(args.workers)),
                    ]
                )
            )
            logger.info("run %d: %.1f s", repeat + 1, runs[-1]["seconds"])
    logger.info("floor: LightGBM and mlflow.pyfunc predict on the prebuilt matrix")
    floor = _run_worker(["floor", str(history), str(model_dir), str(args.floor_repeats)])
    report = summarise(runs, floor, export, load_average, args.workers)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
