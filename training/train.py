"""The training pipeline: history in, a registered, evaluated ``challenger`` model out.

:func:`train_from_history` is the one entry point, used by ``cancel-risk train`` and the
retraining notebook. Its stages are separate functions so each can be run and tested alone:

1. load the history and cut it at ``as_of`` (default: the latest event): nothing after it is
   read, labels included;
2. :func:`fit_and_evaluate`: the snapshot training set, the aggregates learned at
   ``as_of``, the model, the two baselines, the holdout evaluation, the simulator's truth when
   the history has it, and the plots (no MLflow);
3. :func:`log_training_outcome`: one MLflow run with parameters, metrics, the config, the
   dataset digest and period, the plots, the holdout and the pyfunc model, registered as the
   ``challenger``;
4. optionally :func:`training.registry.promote_if_better`.
"""

from __future__ import annotations

import logging
import math
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from core.aggregates import HistoryAggregates
from core.counterfactuals import build_reference_values
from core.features import (
    CATEGORICAL_COLUMNS,
    FEATURE_COLUMNS,
    FEATURE_VERSION,
    STATIC_COLUMNS,
    open_postings_at,
)
from core.ingest import load_history
from core.model import RiskModel
from core.pyfunc import build_input_example
from core.tables import HistoryTables
from training.config import TrainingConfig, load_training_config
from training.dataset import build_training_set, fit_training_aggregates, known_at
from training.evaluate import (
    HoldoutEvaluation,
    build_comparison_table,
    evaluate_against_truth,
    evaluate_holdout,
    fit_baselines,
    load_truth,
)
from training.fit import TrainingDataError, fit_risk_model
from training.plots import (
    plot_calibration_curve,
    plot_feature_importance,
    plot_shap_summary,
    plot_slice_metrics,
    render_png,
)
from training.reason_quality import (
    TRUTH_CAUSES_FILE,
    ReasonQuality,
    evaluate_history_reasons,
    log_reason_quality,
)
from training.registry import (
    CHALLENGER_ALIAS,
    PromotionResult,
    build_dataset_digest,
    ensure_experiment,
    flatten_params,
    log_holdout,
    log_metric_group,
    log_risk_model,
    promote_if_better,
    set_alias,
)

logger = logging.getLogger(__name__)

INPUT_EXAMPLE_POSTINGS = 2
# Columns of a training-set row that describe the moment, not the posting's features.
_MOMENT_COLUMNS = ("posting_number", "as_of", "ordered_at", "label", "split")


class StageTimer:
    """Wall time of each named stage of a run (logged, and kept for the benchmark)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            logger.info("stage %s: %.1f s", name, self.seconds[name])


@dataclass
class TrainingOutcome:
    """Everything a training run produced before anything is logged."""

    as_of: pd.Timestamp
    training_set: pd.DataFrame
    model: RiskModel
    holdout: HoldoutEvaluation
    truth_metrics: dict[str, float] | None
    comparison: pd.DataFrame
    plots: dict[str, bytes]
    dataset_digest: str
    input_example: pd.DataFrame | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reason_quality: ReasonQuality | None = None  # a simulated history's truth_causes.csv


@dataclass
class TrainResult:
    """What a training run logged and decided (see ``TrainingOutcome`` for the objects)."""

    run_id: str
    model_uri: str
    model_version: str | None
    as_of: pd.Timestamp
    metrics: dict[str, float]
    baseline_metrics: dict[str, dict[str, float]]
    truth_metrics: dict[str, float] | None
    comparison: pd.DataFrame
    slice_metrics: pd.DataFrame
    plots: dict[str, bytes] = field(repr=False)
    promotion: PromotionResult | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reason_quality: ReasonQuality | None = None

    @property
    def promoted(self) -> bool:
        return self.promotion is not None and self.promotion.promoted


def train_from_history(
    history_dir: str | Path,
    as_of: pd.Timestamp | str | None = None,
    config: TrainingConfig | None = None,
    promote_if_better: bool = False,
) -> TrainResult:
    """Train, evaluate, log and register a model on the history known at ``as_of``.

    Training reads only the history cut at ``as_of``. The simulator's ``truth.csv``, when
    present, is an evaluation of the postings open at the export moment and is scored on the
    whole history. Logs to MLflow's current tracking URI. With ``promote_if_better`` the new
    version becomes ``champion`` when it beats the current one (or when there is none).
    """
    config = config or load_training_config()
    history_dir = Path(history_dir)
    timer = StageTimer()
    with timer.stage("load_history"):
        tables = load_history(history_dir)
        cut = resolve_as_of(tables, as_of)
        known = known_at(tables, cut)
        truth = load_truth(history_dir)
    outcome = fit_and_evaluate(known, cut, config, truth=truth, truth_tables=tables, timer=timer)
    if (history_dir / TRUTH_CAUSES_FILE).exists():
        with timer.stage("reason_quality"):
            outcome.reason_quality = evaluate_history_reasons(outcome.model, tables, history_dir)
    with timer.stage("log_and_register"):
        run_id, model_info = log_training_outcome(outcome, config, history_dir=history_dir)
    version = _registered_version(model_info)
    promotion = None
    if promote_if_better and version is not None:
        with timer.stage("promote"):
            promotion = promote_if_better_than_champion(config, version)
    return TrainResult(
        run_id=run_id,
        model_uri=model_info.model_uri,
        model_version=version,
        as_of=cut,
        metrics=outcome.holdout.metrics,
        baseline_metrics=outcome.holdout.baseline_metrics,
        truth_metrics=outcome.truth_metrics,
        comparison=outcome.comparison,
        slice_metrics=outcome.holdout.slice_metrics,
        plots=outcome.plots,
        promotion=promotion,
        stage_seconds=dict(timer.seconds),
        reason_quality=outcome.reason_quality,
    )


def promote_if_better_than_champion(
    config: TrainingConfig, version: str | None = None
) -> PromotionResult:
    """Promote ``version`` (default: the challenger) by the config's promotion rule."""
    return promote_if_better(
        config.mlflow.registered_model_name, config.promotion, config.evaluation, version=version
    )


def resolve_as_of(tables: HistoryTables, as_of: pd.Timestamp | str | None) -> pd.Timestamp:
    """``as_of`` as a UTC timestamp; the history's latest event when None."""
    if as_of is None:
        latest = tables.latest_event_at()
        if latest is None:
            raise TrainingDataError("the history holds no timestamp at all: nothing to train on")
        return pd.Timestamp(latest).tz_convert("UTC")
    moment = pd.Timestamp(as_of)
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


def fit_cancel_risk_model(
    training_set: pd.DataFrame,
    config: TrainingConfig,
    aggregates: HistoryAggregates,
    metadata: dict | None = None,
) -> RiskModel:
    """The project's model on a training set, carrying its feature contract, the costs its
    thresholds came from, and the typical order the explanations compare with."""
    return fit_risk_model(
        training_set,
        config,
        feature_columns=list(FEATURE_COLUMNS),
        categorical_columns=list(CATEGORICAL_COLUMNS),
        feature_version=FEATURE_VERSION,
        aggregates=aggregates,
        metadata={
            "costs": config.costs.model_dump(),
            "reference_values": build_reference_values(
                training_set[training_set["split"] == "train"], CATEGORICAL_COLUMNS
            ),
            **(metadata or {}),
        },
    )


def fit_and_evaluate(
    tables: HistoryTables,
    as_of: pd.Timestamp,
    config: TrainingConfig,
    *,
    truth: pd.DataFrame | None = None,
    truth_tables: HistoryTables | None = None,
    timer: StageTimer | None = None,
) -> TrainingOutcome:
    """Build the training set from ``tables`` (already cut at ``as_of``), fit and evaluate.

    ``truth`` (the simulator's ``truth.csv``) is scored on ``truth_tables``, the whole history:
    its postings are those open at the export moment.
    """
    timer = timer or StageTimer()
    columns = {
        "feature_columns": list(FEATURE_COLUMNS),
        "categorical_columns": list(CATEGORICAL_COLUMNS),
        "feature_version": FEATURE_VERSION,
    }
    with timer.stage("training_set"):
        # One point-in-time aggregates object serves the training rows and, stored, serving.
        aggregates = fit_training_aggregates(tables, as_of, config.snapshots)
        training_set = build_training_set(tables, as_of, config.snapshots, aggregates=aggregates)
        digest = build_dataset_digest(training_set)
    with timer.stage("fit_model"):
        model = fit_cancel_risk_model(
            training_set,
            config,
            aggregates,
            metadata={
                "as_of": as_of.isoformat(),
                "training_period": _period(training_set),
                "dataset_digest": digest,
                "calibration_method": config.calibration.method,
            },
        )
    with timer.stage("fit_baselines"):
        baselines = fit_baselines(training_set, config, static_columns=STATIC_COLUMNS, **columns)
    with timer.stage("evaluate"):
        test = training_set[training_set["split"] == "test"]
        holdout = evaluate_holdout(model, test, config.evaluation, baselines)
        model.metadata["holdout_metrics"] = _finite(holdout.metrics)
        truth_metrics = None
        if truth is not None:
            truth_metrics = evaluate_against_truth(
                model,
                truth_tables if truth_tables is not None else tables,
                truth,
                config.evaluation,
            )
            model.metadata["truth_metrics"] = _finite(truth_metrics)
    with timer.stage("plots"):
        plots = build_plots(model, holdout, test, config)
    return TrainingOutcome(
        as_of=as_of,
        training_set=training_set,
        model=model,
        holdout=holdout,
        truth_metrics=truth_metrics,
        comparison=build_comparison_table(holdout.metrics, holdout.baseline_metrics, truth_metrics),
        plots=plots,
        dataset_digest=digest,
        input_example=build_model_input_example(tables, as_of),
        stage_seconds=dict(timer.seconds),
    )


def build_plots(
    model: RiskModel, holdout: HoldoutEvaluation, test: pd.DataFrame, config: TrainingConfig
) -> dict[str, bytes]:
    """The run's PNG plots by file name."""
    sample = test.sample(
        n=min(len(test), config.evaluation.shap_sample_rows), random_state=config.lightgbm.seed
    )
    matrix = model.build_matrix(sample)
    contributions = model.booster.predict(matrix, pred_contrib=True)
    figures = {
        "calibration_curve.png": plot_calibration_curve(
            holdout.labels,
            {"model": holdout.probabilities, **holdout.baseline_probabilities},
            config.evaluation.ece_bins,
        ),
        "feature_importance.png": plot_feature_importance(model.booster),
        "slice_metrics.png": plot_slice_metrics(holdout.slice_metrics),
        "shap_summary.png": plot_shap_summary(contributions, matrix, model.feature_columns),
    }
    return {name: render_png(figure) for name, figure in figures.items()}


def build_model_input_example(tables: HistoryTables, as_of: pd.Timestamp) -> pd.DataFrame | None:
    """Raw input rows for a few postings open at ``as_of`` (None when none is open)."""
    open_postings = open_postings_at(tables, as_of)
    if len(open_postings) == 0:
        return None
    return build_input_example(tables, open_postings[:INPUT_EXAMPLE_POSTINGS], as_of)


def log_training_outcome(
    outcome: TrainingOutcome, config: TrainingConfig, *, history_dir: Path | None = None
) -> tuple[str, Any]:
    """Log the outcome as one MLflow run and register the model as ``challenger``.

    Returns the run id and MLflow's ``ModelInfo`` of the logged model.
    """
    experiment_id = ensure_experiment(config.mlflow.experiment_name)
    training_set = outcome.training_set
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags(
            {
                "as_of": outcome.as_of.isoformat(),
                "feature_version": str(outcome.model.feature_version),
                "dataset_digest": outcome.dataset_digest,
                "python": platform.python_version(),
            }
        )
        mlflow.log_params(
            {
                **flatten_params(config.model_dump(mode="json")),
                "as_of": outcome.as_of.isoformat(),
                "history_dir": str(history_dir) if history_dir is not None else "",
                "feature_version": str(outcome.model.feature_version),
                "n_features": len(outcome.model.feature_columns),
                "best_iteration": outcome.model.metadata.get("best_iteration"),
                "dataset_digest": outcome.dataset_digest,
                "dataset_period_start": _period(training_set)["start"],
                "dataset_period_end": _period(training_set)["end"],
                **{f"rows_{name}": n for name, n in _split_sizes(training_set).items()},
                **_dataset_counts(training_set),
            }
        )
        log_dataset(training_set, outcome.dataset_digest)
        log_metric_group("stage_seconds", outcome.stage_seconds)
        log_metric_group("holdout", _finite(outcome.holdout.metrics))
        for name, metrics in outcome.holdout.baseline_metrics.items():
            log_metric_group(f"baseline_{name}", _finite(metrics))
        if outcome.truth_metrics is not None:
            log_metric_group("truth", _finite(outcome.truth_metrics))
        if outcome.reason_quality is not None:
            log_reason_quality(outcome.reason_quality)
        mlflow.log_text(config.to_yaml(), "config/training_config.yaml")
        mlflow.log_text(outcome.comparison.to_csv(index=False), "evaluation/comparison.csv")
        mlflow.log_text(
            outcome.holdout.slice_metrics.to_csv(index=False), "evaluation/slice_metrics.csv"
        )
        for name, png in outcome.plots.items():
            _log_bytes(png, f"plots/{name}")
        log_holdout(training_set[training_set["split"] == "test"])
        model_info = log_risk_model(
            outcome.model,
            input_example=outcome.input_example,
            registered_model_name=config.mlflow.registered_model_name,
        )
    version = _registered_version(model_info)
    if version is not None:
        set_alias(config.mlflow.registered_model_name, CHALLENGER_ALIAS, version)
    logger.info("run %s: model version %s is the %s", run.info.run_id, version, CHALLENGER_ALIAS)
    return run.info.run_id, model_info


def log_dataset(training_set: pd.DataFrame, digest: str) -> None:
    """Record the training set (its moments, not its features) as the run's input dataset."""
    with warnings.catch_warnings():
        # MLflow's hint about integer columns concerns serving schemas, not a logged dataset.
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        dataset = mlflow.data.from_pandas(
            training_set[list(_MOMENT_COLUMNS)], name="training_set", digest=digest
        )
        mlflow.log_input(dataset, context="training")


def format_comparison(comparison: pd.DataFrame) -> str:
    """The comparison table as fixed-width text (for the terminal)."""
    return comparison.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")


def _registered_version(model_info: Any) -> str | None:
    version = getattr(model_info, "registered_model_version", None)
    return None if version is None else str(version)


def _dataset_counts(training_set: pd.DataFrame) -> dict[str, Any]:
    """The training set's own counts (moments, censored, excluded, ...) as parameters."""
    keys = ("moments", "labelled", "positives", "censored", "excluded")
    return {f"dataset_{key}": training_set.attrs[key] for key in keys if key in training_set.attrs}


def _split_sizes(training_set: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in training_set["split"].value_counts().sort_index().items()}


def _period(training_set: pd.DataFrame) -> dict[str, str]:
    """The first and last scoring moment of the training set."""
    moments = pd.to_datetime(training_set["as_of"], utc=True)
    return {"start": moments.min().isoformat(), "end": moments.max().isoformat()}


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics without NaN (a single-class slice has no AUC): MLflow and JSON stay clean."""
    return {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}


def _log_bytes(data: bytes, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_bytes(data)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent))
