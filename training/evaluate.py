"""Holdout evaluation: headline metrics, metrics by slice, two baselines, and the simulator's truth.

Everything is measured on the ``test`` split of the training set, the newest orders, which no
model or calibrator has seen. The baselines answer "what do the point-in-time features add":

- ``logistic``: logistic regression on the same features (imputation, scaling and one-hot
  encoding in one scikit-learn Pipeline);
- ``static_lightgbm``: the same LightGBM recipe on the order's static attributes only
  (``STATIC_COLUMNS``: what is known the moment the order arrives).

Both are calibrated on the same calibration split as the model, so Brier and calibration
compare like with like.

Metric conventions (``compute_metrics``):

- ``pr_auc`` is scikit-learn's average precision (a step-wise area, no interpolation);
- ``ece`` is the expected calibration error over **equal-mass** bins (each holds the same
  number of postings, ordered by probability): with a low base rate, equal-width bins would put
  almost every posting in the first bin and hide the miscalibration that matters;
- ``precision_top`` / ``recall_top`` are over the ``top_fraction`` (10 % by default) of postings
  with the highest probability, the ones a seller would act on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from core.calibration import Calibrator
from training.fit import TrainingDataError, fit_configured_calibrator, fit_risk_model

if TYPE_CHECKING:
    from core.model import RiskModel
    from core.tables import HistoryTables
    from training.config import EvaluationConfig, TrainingConfig

logger = logging.getLogger(__name__)

TRUTH_FILE = "truth.csv"
HEADLINE_METRICS = ("roc_auc", "pr_auc", "brier", "log_loss", "ece")
# Upper edges (exclusive) of the days-since-order buckets, and their labels.
DAYS_SINCE_ORDER_EDGES = (1, 2, 4, 8)
DAYS_SINCE_ORDER_LABELS = ("0", "1", "2-3", "4-7", "8+")
_PROBABILITY_EPS = 1e-15
_MISSING_CATEGORY = "__missing__"


class Scorer(Protocol):
    """Anything that turns feature rows into calibrated probabilities."""

    def score_features(self, features: pd.DataFrame) -> np.ndarray: ...


# --- metrics -------------------------------------------------------------------------------


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log-likelihood, probabilities clipped to ``[1e-15, 1 - 1e-15]``."""
    y = np.asarray(labels, dtype="float64")
    p = np.clip(np.asarray(probabilities, dtype="float64"), _PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared difference between probability and outcome."""
    y = np.asarray(labels, dtype="float64")
    p = np.asarray(probabilities, dtype="float64")
    return float(np.mean((p - y) ** 2))


def build_calibration_table(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10
) -> pd.DataFrame:
    """Equal-mass bins by probability: ``n``, ``mean_probability``, ``observed_rate`` per bin.

    Postings are sorted by probability (ties in input order) and cut into ``n_bins`` groups of
    sizes differing by at most one; fewer postings than bins give one posting per bin.
    """
    y = np.asarray(labels, dtype="float64")
    p = np.asarray(probabilities, dtype="float64")
    order = np.argsort(p, kind="stable")
    groups = [g for g in np.array_split(order, min(n_bins, len(p))) if len(g)]
    return pd.DataFrame(
        {
            "bin": np.arange(len(groups)),
            "n": [len(g) for g in groups],
            "mean_probability": [float(p[g].mean()) for g in groups],
            "observed_rate": [float(y[g].mean()) for g in groups],
        }
    )


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10
) -> float:
    """Equal-mass ECE: ``Σ_b (n_b / N) · |observed_rate_b − mean_probability_b|``."""
    if len(probabilities) == 0:
        return math.nan
    table = build_calibration_table(labels, probabilities, n_bins)
    gaps = (table["observed_rate"] - table["mean_probability"]).abs()
    return float((table["n"] * gaps).sum() / table["n"].sum())


def precision_recall_at_top(
    labels: np.ndarray, probabilities: np.ndarray, fraction: float = 0.1
) -> tuple[float, float]:
    """Precision and recall among the ``ceil(fraction · N)`` highest probabilities.

    Ties at the cut are broken by input order (a stable sort), so the result is deterministic.
    """
    y = np.asarray(labels, dtype="float64")
    p = np.asarray(probabilities, dtype="float64")
    if len(p) == 0:
        return math.nan, math.nan
    k = max(1, math.ceil(fraction * len(p)))
    top = np.argsort(-p, kind="stable")[:k]
    hits = float(y[top].sum())
    positives = float(y.sum())
    return hits / k, (hits / positives if positives > 0 else math.nan)


def compute_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    *,
    ece_bins: int = 10,
    top_fraction: float = 0.1,
) -> dict[str, float]:
    """The headline metrics of probabilities against 0/1 labels (see the module docstring).

    Ranking metrics are NaN when the labels hold a single class.
    """
    y = np.asarray(labels, dtype="int64")
    p = np.asarray(probabilities, dtype="float64")
    both_classes = np.unique(y).size == 2
    precision_top, recall_top = precision_recall_at_top(y, p, top_fraction)
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else math.nan,
        "pr_auc": float(average_precision_score(y, p)) if both_classes else math.nan,
        "brier": brier_score(y, p) if len(y) else math.nan,
        "log_loss": log_loss(y, p) if len(y) else math.nan,
        "ece": expected_calibration_error(y, p, ece_bins),
        "precision_top": precision_top,
        "recall_top": recall_top,
        "n": float(len(y)),
        "positives": float(y.sum()),
        "base_rate": float(y.mean()) if len(y) else math.nan,
        "mean_probability": float(p.mean()) if len(p) else math.nan,
    }


# --- slices --------------------------------------------------------------------------------


def _pooled(values: pd.Series, min_rows: int) -> pd.Series:
    """``values`` as strings, the levels with fewer than ``min_rows`` rows pooled as ``other``."""
    text = values.astype("string").fillna("unknown")
    return text.where(text.map(text.value_counts()).ge(min_rows), "other")


def build_slice_values(frame: pd.DataFrame, min_rows: int = 30) -> pd.DataFrame:
    """The slice each row belongs to, as strings: carrier, days-since-order bucket, handed over,
    and the region and payment type when the frame has them.

    Levels with fewer than ``min_rows`` rows are pooled as ``other`` so no slice is noise.
    """
    carrier = _pooled(frame["carrier_id"], min_rows)
    days = pd.to_numeric(frame["days_since_order"], errors="coerce").to_numpy(dtype="float64")
    buckets = np.searchsorted(np.asarray(DAYS_SINCE_ORDER_EDGES, dtype="float64"), days, "right")
    days_bucket = pd.Series(
        np.asarray(DAYS_SINCE_ORDER_LABELS, dtype=object)[buckets], index=frame.index
    ).where(~np.isnan(days), "unknown")
    handed_over = (
        frame["is_handed_over"]
        .astype("boolean")
        .map({True: "handed_over", False: "not_handed_over"})
    )
    slices = {
        "carrier_id": carrier,
        "days_since_order": days_bucket.astype("string"),
        "is_handed_over": handed_over.astype("string").fillna("unknown"),
    }
    for column in ("region", "payment_type"):
        if column in frame.columns:
            slices[column] = _pooled(frame[column], min_rows)
    return pd.DataFrame(slices, index=frame.index)


def compute_slice_metrics(
    frame: pd.DataFrame,
    probabilities: np.ndarray,
    *,
    ece_bins: int = 10,
    top_fraction: float = 0.1,
    min_rows: int = 30,
) -> pd.DataFrame:
    """Metrics per slice value: one row per (``slice``, ``value``), sorted, with ``n``."""
    slices = build_slice_values(frame, min_rows)
    labels = frame["label"].to_numpy(dtype="int64")
    p = np.asarray(probabilities, dtype="float64")
    rows = []
    for column in slices.columns:
        for value, positions in slices.groupby(column, sort=True).indices.items():
            metrics = compute_metrics(
                labels[positions],
                p[positions],
                ece_bins=min(ece_bins, max(2, len(positions) // min_rows)),
                top_fraction=top_fraction,
            )
            rows.append({"slice": column, "value": str(value), **metrics})
    return pd.DataFrame(rows)


# --- baselines -----------------------------------------------------------------------------


@dataclass
class LogisticBaseline:
    """Logistic regression on the model's features, calibrated like the model."""

    pipeline: Pipeline
    calibrator: Calibrator
    feature_columns: tuple[str, ...]

    def score_features(self, features: pd.DataFrame) -> np.ndarray:
        raw = self.pipeline.predict_proba(features[list(self.feature_columns)])[:, 1]
        return self.calibrator.transform(raw)


def build_logistic_pipeline(
    numeric_columns: Sequence[str], categorical_columns: Sequence[str], seed: int = 0
) -> Pipeline:
    """Impute (median, with missing indicators), scale and one-hot encode, then regress.

    Unseen categories at scoring are ignored by the encoder; rare ones are pooled.
    """
    numeric = Pipeline(
        [
            ("as_float", FunctionTransformer(_as_float, feature_names_out="one-to-one")),
            (
                "impute",
                SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            ),
            ("scale", StandardScaler()),
        ]
    )
    categorical = Pipeline(
        [
            ("as_text", FunctionTransformer(_as_category_text, feature_names_out="one-to-one")),
            ("one_hot", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=20)),
        ]
    )
    columns = ColumnTransformer(
        [("numeric", numeric, list(numeric_columns))]
        + ([("categorical", categorical, list(categorical_columns))] if categorical_columns else [])
    )
    return Pipeline(
        [("columns", columns), ("logistic", LogisticRegression(max_iter=2000, random_state=seed))]
    )


def _as_float(frame: pd.DataFrame) -> np.ndarray:
    return frame.to_numpy(dtype="float64", na_value=np.nan)


def _as_category_text(frame: pd.DataFrame) -> np.ndarray:
    return frame.astype("string").fillna(_MISSING_CATEGORY).to_numpy(dtype=object)


def fit_logistic_baseline(
    training_set: pd.DataFrame,
    config: TrainingConfig,
    *,
    feature_columns: Sequence[str],
    categorical_columns: Sequence[str],
) -> LogisticBaseline:
    """Fit on ``train`` and calibrate on ``calibration`` (nothing stops early: no ``valid``)."""
    categorical = [c for c in feature_columns if c in set(categorical_columns)]
    numeric = [c for c in feature_columns if c not in set(categorical)]
    train = training_set[training_set["split"] == "train"]
    calibration = training_set[training_set["split"] == "calibration"]
    pipeline = build_logistic_pipeline(numeric, categorical, seed=config.lightgbm.seed)
    pipeline.fit(train[list(feature_columns)], train["label"].to_numpy(dtype="int64"))
    raw = pipeline.predict_proba(calibration[list(feature_columns)])[:, 1]
    calibrator = fit_configured_calibrator(raw, calibration["label"].to_numpy(), config)
    return LogisticBaseline(pipeline, calibrator, tuple(feature_columns))


def fit_baselines(
    training_set: pd.DataFrame,
    config: TrainingConfig,
    *,
    feature_columns: Sequence[str],
    categorical_columns: Sequence[str],
    static_columns: Sequence[str],
    feature_version: str,
) -> dict[str, Scorer]:
    """The two baselines of every run, fitted on the model's splits."""
    static = [c for c in feature_columns if c in set(static_columns)]
    return {
        "logistic": fit_logistic_baseline(
            training_set,
            config,
            feature_columns=feature_columns,
            categorical_columns=categorical_columns,
        ),
        "static_lightgbm": fit_risk_model(
            training_set,
            config,
            feature_columns=static,
            categorical_columns=[c for c in categorical_columns if c in set(static)],
            feature_version=feature_version,
        ),
    }


# --- holdout -------------------------------------------------------------------------------


@dataclass
class HoldoutEvaluation:
    """The model and the baselines on the test split."""

    metrics: dict[str, float]
    baseline_metrics: dict[str, dict[str, float]]
    slice_metrics: pd.DataFrame
    labels: np.ndarray
    probabilities: np.ndarray
    baseline_probabilities: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate_holdout(
    model: Scorer,
    test: pd.DataFrame,
    evaluation: EvaluationConfig,
    baselines: Mapping[str, Scorer] | None = None,
) -> HoldoutEvaluation:
    """Score the test rows with the model and every baseline and measure them."""
    if len(test) == 0:
        raise TrainingDataError("the 'test' split of the training set is empty")
    labels = test["label"].to_numpy(dtype="int64")
    probabilities = model.score_features(test)
    options = {"ece_bins": evaluation.ece_bins, "top_fraction": evaluation.top_fraction}
    baseline_probabilities = {
        name: baseline.score_features(test) for name, baseline in (baselines or {}).items()
    }
    return HoldoutEvaluation(
        metrics=compute_metrics(labels, probabilities, **options),
        baseline_metrics={
            name: compute_metrics(labels, p, **options)
            for name, p in baseline_probabilities.items()
        },
        slice_metrics=compute_slice_metrics(
            test, probabilities, min_rows=evaluation.min_slice_rows, **options
        ),
        labels=labels,
        probabilities=probabilities,
        baseline_probabilities=baseline_probabilities,
    )


# --- the simulator's truth -----------------------------------------------------------------


def load_truth(history_dir: str | Path) -> pd.DataFrame | None:
    """The simulator's ``truth.csv`` of a history directory, or None when it has none."""
    path = Path(history_dir) / TRUTH_FILE
    if not path.is_file():
        return None
    truth = pd.read_csv(path, dtype={"posting_number": "string"})
    truth["as_of"] = pd.to_datetime(truth["as_of"], utc=True)
    truth["label"] = pd.to_numeric(truth["label"], errors="coerce").astype("Int64")
    return truth


def evaluate_against_truth(
    model: RiskModel,
    tables: HistoryTables,
    truth: pd.DataFrame,
    evaluation: EvaluationConfig,
) -> dict[str, float]:
    """The model against the true probabilities on the postings open at the export moment.

    The model scores those postings at the truth's ``as_of`` from the history; postings without
    a label (a non-buyer cancellation, or still open when the simulation stopped) are left out.
    Returns ``model_*`` and ``truth_*`` metrics on exactly the same postings.
    """
    labelled = truth[truth["label"].notna()]
    scored = []
    for as_of, group in labelled.groupby("as_of", sort=True):
        scores = model.score_tables(tables, pd.Timestamp(as_of))
        scored.append(group.merge(scores, on="posting_number", how="inner"))
    joined = pd.concat(scored, ignore_index=True) if scored else labelled.iloc[:0]
    if len(joined) < len(labelled):
        logger.warning(
            "%d of %d truth postings were not open in the history at their as_of",
            len(labelled) - len(joined),
            len(labelled),
        )
    labels = joined["label"].to_numpy(dtype="int64")
    options = {"ece_bins": evaluation.ece_bins, "top_fraction": evaluation.top_fraction}
    model_metrics = compute_metrics(labels, joined["probability"].to_numpy(), **options)
    truth_metrics = compute_metrics(labels, joined["true_probability"].to_numpy(), **options)
    result = {f"model_{k}": v for k, v in model_metrics.items() if k in HEADLINE_METRICS}
    result.update({f"truth_{k}": v for k, v in truth_metrics.items() if k in HEADLINE_METRICS})
    result.update(
        n=float(len(joined)),
        positives=float(labels.sum()),
        roc_auc_gap=result["truth_roc_auc"] - result["model_roc_auc"],
    )
    return result


def build_comparison_table(
    metrics: Mapping[str, float],
    baseline_metrics: Mapping[str, Mapping[str, float]],
    truth_metrics: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Headline metrics side by side: the model and baselines on the holdout, then the truth.

    The truth rows are measured on another population (the postings open at the export
    moment), hence the ``population`` column.
    """
    rows = [{"name": "model", "population": "holdout", **_headline(metrics)}]
    rows += [
        {"name": name, "population": "holdout", **_headline(values)}
        for name, values in baseline_metrics.items()
    ]
    if truth_metrics:
        for prefix, name in (("model_", "model"), ("truth_", "true_probability")):
            values = {
                key: truth_metrics.get(f"{prefix}{key}", math.nan) for key in HEADLINE_METRICS
            }
            rows.append({"name": name, "population": "open_at_export", **values})
    return pd.DataFrame(rows)


def _headline(metrics: Mapping[str, float]) -> dict[str, float]:
    return {key: metrics.get(key, math.nan) for key in HEADLINE_METRICS}
