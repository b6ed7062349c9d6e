"""Do the reasons name the real cause? Our reasons and TreeSHAP's against the simulator's truth.

A simulated history written with ``--truth`` holds ``truth_causes.csv``: for every posting open
at the export moment, each cause's contribution to its true cancellation probability and its
``dominant_cause`` (:mod:`simulator.causes`). :func:`evaluate_reasons` scores those postings at
the truth's moment, keeps the medium- and high-risk ones (the ones that get reasons) whose true
dominant cause is not ``none``, and compares with it

- **ours**: the reasons the batch, the report and the REST service give
  (:func:`core.explain.build_explanation_columns`, counterfactual risk drops);
- **treeshap**: LightGBM's TreeSHAP contributions (``pred_contrib=True``) summed per cause over
  the features of :data:`SHAP_CAUSE_FEATURES`, the causes with a positive sum ranked largest
  first: the usual way to read reasons off a tree model, as the baseline.

Metrics (:func:`reason_metrics`), each over the evaluated postings:

- ``top1``: the first reason is the true dominant cause;
- ``recall_at_3``: the true dominant cause is among the (up to) three reasons;
- per cause, over the first reasons: ``precision`` (of the postings whose first reason is the
  cause, the share whose dominant cause it is) and ``recall`` (of the postings whose dominant
  cause it is, the share whose first reason it is), with their counts.

A posting whose first reason is :data:`core.playbook.NO_SINGLE_CAUSE` (or which has none) counts
as a miss. Run by ``cancel-risk evaluate-reasons``; :func:`log_reason_quality` logs the metrics
into an active MLflow run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.counterfactuals import CAUSES
from core.explain import MAX_REASONS, build_explanation_columns
from core.features import build_features
from training.evaluate import load_truth

if TYPE_CHECKING:
    from core.model import RiskModel
    from core.tables import HistoryTables

TRUTH_CAUSES_FILE = "truth_causes.csv"
NO_CAUSE = "none"
METHODS = ("ours", "treeshap")

# Each model feature summed into one cause for the TreeSHAP reasons: the features the cause's
# counterfactual sets (core/counterfactuals.py), a feature two fixes set going to the cause
# it describes (hours_since_last_activity: tracking). Features of no cause are left out.
SHAP_CAUSE_FEATURES: dict[str, tuple[str, ...]] = {
    "price_drop": (
        "price_change_pct",
        "lowest_price_change_pct",
        "price_changes_since_purchase",
        "promotion_since_purchase",
    ),
    "late_delivery": (
        "hours_to_promised_delivery_end",
        "delivery_date_changes",
        "delivery_date_shift_hours",
    ),
    "tracking_quiet": (
        "hours_since_last_activity",
        "hours_since_last_scan",
        "silent_hours_since_handover",
    ),
    "not_shipped": ("is_handed_over", "hours_since_handover"),
    "listing_changed": ("card_edits_since_purchase", "hours_since_last_card_edit"),
    "buyer_profile": (
        "buyer_earlier_buyer_cancels",
        "buyer_earlier_postings",
        "payment_type",
        "region",
        "region_buyer_cancel_rate",
    ),
    "early_remorse": ("hours_since_order",),
    "slow_carrier": ("carrier", "carrier_buyer_cancel_rate", "promised_lead_time_hours"),
}


class TruthCausesError(Exception):
    """The history has no (readable) ``truth_causes.csv``."""


def load_truth_causes(history_dir: str | Path) -> pd.DataFrame:
    """The simulator's ``truth_causes.csv`` of a history directory."""
    path = Path(history_dir) / TRUTH_CAUSES_FILE
    if not path.is_file():
        raise TruthCausesError(
            f"{path} not found: reason quality needs a simulated history written with "
            "`cancel-risk simulate --truth`"
        )
    frame = pd.read_csv(path, dtype={"posting_number": "string", "dominant_cause": "string"})
    missing = {"posting_number", "dominant_cause"} - set(frame.columns)
    if missing:
        raise TruthCausesError(f"{path} has no column(s) {sorted(missing)}")
    return frame


# --- metrics -------------------------------------------------------------------------------


def reason_metrics(
    true_causes: Sequence[str] | np.ndarray, reasons: np.ndarray, causes: Sequence[str] = CAUSES
) -> tuple[dict[str, float], pd.DataFrame]:
    """Top-1, recall@3 and per-cause precision/recall of ranked ``reasons`` (rows x slots of
    codes, None past the last) against each row's true dominant cause.

    Returns the summary (``n``, ``top1``, ``recall_at_3``) and one row per cause: ``true`` (rows
    whose dominant cause it is), ``named`` (rows whose first reason it is), ``hits`` (both),
    ``precision`` = hits / named, ``recall`` = hits / true (NaN over no rows).
    """
    truth = np.asarray(true_causes, dtype=object)
    reasons = np.asarray(reasons, dtype=object)
    if reasons.ndim == 1:
        reasons = reasons[:, None]
    first = reasons[:, 0] if reasons.shape[1] else np.full(len(truth), None, dtype=object)
    top3 = reasons[:, :3]
    n = len(truth)
    summary = {
        "n": float(n),
        "top1": float(np.mean(first == truth)) if n else math.nan,
        "recall_at_3": float(np.mean((top3 == truth[:, None]).any(axis=1))) if n else math.nan,
    }
    rows = []
    for cause in causes:
        true = int(np.sum(truth == cause))
        named = int(np.sum(first == cause))
        hits = int(np.sum((truth == cause) & (first == cause)))
        rows.append(
            {
                "cause": cause,
                "true": true,
                "named": named,
                "hits": hits,
                "precision": hits / named if named else math.nan,
                "recall": hits / true if true else math.nan,
            }
        )
    return summary, pd.DataFrame(rows)


def shap_reasons(
    contributions: np.ndarray,
    feature_columns: Sequence[str],
    groups: Mapping[str, Sequence[str]] = SHAP_CAUSE_FEATURES,
    max_reasons: int = MAX_REASONS,
) -> np.ndarray:
    """Reasons read off TreeSHAP: per row, the causes whose features' contributions sum to a
    positive amount, largest first (rows x ``max_reasons`` codes, None past the last).

    ``contributions`` is LightGBM's ``pred_contrib`` output (a column per feature, then the
    expected value); features of ``groups`` the model lacks are skipped.
    """
    positions = {column: i for i, column in enumerate(feature_columns)}
    causes = list(groups)
    sums = np.column_stack(
        [
            contributions[:, [positions[f] for f in groups[cause] if f in positions]].sum(axis=1)
            for cause in causes
        ]
    )
    order = np.argsort(-sums, axis=1, kind="stable")[:, :max_reasons]
    top = np.take_along_axis(sums, order, axis=1)
    codes = np.array(causes, dtype=object)[order]
    return np.where(top > 0, codes, None)


# --- the evaluation ------------------------------------------------------------------------


@dataclass
class ReasonQuality:
    """Both methods' reasons measured against the truth on the same postings."""

    as_of: pd.Timestamp
    open_postings: int  # open at as_of with a truth row
    medium_high: int  # of them, medium or high risk
    summary: dict[str, dict[str, float]]  # method -> n, top1, recall_at_3
    per_cause: pd.DataFrame  # cause, true, then <method>_named/_hits/_precision/_recall
    evaluated: pd.DataFrame  # posting_number, dominant_cause, <method>_1.._3, probability

    def metrics(self) -> dict[str, float]:
        """Flat, finite metrics for MLflow: ``<method>_top1``, ``<method>_recall_at_3``,
        ``<method>_recall_<cause>``, ``<method>_precision_<cause>``, ``n`` and the counts."""
        flat: dict[str, float] = {
            "n": float(len(self.evaluated)),
            "open_postings": float(self.open_postings),
            "medium_high": float(self.medium_high),
        }
        for method in METHODS:
            flat[f"{method}_top1"] = self.summary[method]["top1"]
            flat[f"{method}_recall_at_3"] = self.summary[method]["recall_at_3"]
            for row in self.per_cause.itertuples(index=False):
                for measure in ("precision", "recall"):
                    flat[f"{method}_{measure}_{row.cause}"] = getattr(row, f"{method}_{measure}")
        return {k: float(v) for k, v in flat.items() if not math.isnan(float(v))}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``--out-json``)."""
        return {
            "as_of": self.as_of.isoformat(),
            "open_postings": self.open_postings,
            "medium_high": self.medium_high,
            "evaluated": len(self.evaluated),
            "summary": self.summary,
            "per_cause": [
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                for row in self.per_cause.to_dict(orient="records")
            ],
        }

    def summary_line(self) -> str:
        """One line for ``train``'s output: both methods' top-1 and recall@3."""
        ours, shap = self.summary["ours"], self.summary["treeshap"]
        return (
            f"reasons vs the simulator's causes ({len(self.evaluated):,} medium/high orders): "
            f"top-1 {_pct(ours['top1'])}, recall@3 {_pct(ours['recall_at_3'])} "
            f"(TreeSHAP {_pct(shap['top1'])}, {_pct(shap['recall_at_3'])})"
        )

    def format(self) -> str:
        """The summary and the per-cause table as fixed-width text (for the terminal)."""
        lines = [
            f"as of {self.as_of.isoformat()}: {self.open_postings} open postings with a truth, "
            f"{self.medium_high} medium/high risk, {len(self.evaluated)} of them with a true "
            "dominant cause",
            "",
            f"{'':10} {'top-1':>7} {'recall@3':>9}",
        ]
        for method in METHODS:
            s = self.summary[method]
            lines.append(f"{method:10} {_pct(s['top1']):>7} {_pct(s['recall_at_3']):>9}")
        table = self.per_cause.copy()
        for column in table.columns:
            if column.endswith(("_precision", "_recall")):
                table[column] = table[column].map(_pct)
        lines += ["", table.to_string(index=False)]
        return "\n".join(lines)


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def evaluate_reasons(
    model: RiskModel,
    tables: HistoryTables,
    truth_causes: pd.DataFrame,
    as_of: pd.Timestamp,
) -> ReasonQuality:
    """Our reasons and TreeSHAP's on the medium/high postings open at ``as_of`` that have a
    true dominant cause (see the module docstring)."""
    features = build_features(tables, as_of, aggregates=model.aggregates)
    truth = truth_causes.set_index("posting_number")
    features = features[features.index.isin(truth.index)]
    probabilities = model.score_features(features)
    levels = np.asarray(model.risk_levels(probabilities), dtype=object)
    risky = levels != "low"
    dominant = truth["dominant_cause"].reindex(features.index).to_numpy(dtype=object)
    chosen = np.flatnonzero(risky & (dominant != NO_CAUSE))

    explained = build_explanation_columns(model, features, probabilities, with_reasons=risky)
    ours = explained.codes[chosen]
    matrix = model.build_matrix(features.iloc[chosen])
    contributions = (
        model.booster.predict(matrix, pred_contrib=True)
        if len(chosen)
        else np.zeros((0, len(model.feature_columns) + 1))
    )
    shap = shap_reasons(contributions, model.feature_columns)

    truth_chosen = dominant[chosen]
    summary: dict[str, dict[str, float]] = {}
    per_cause = None
    for method, reasons in (("ours", ours), ("treeshap", shap)):
        summary[method], table = reason_metrics(truth_chosen, reasons)
        table = table.rename(columns={c: f"{method}_{c}" for c in table.columns[2:]})
        per_cause = table if per_cause is None else per_cause.merge(table, on=["cause", "true"])
    evaluated = pd.DataFrame(
        {
            "posting_number": pd.array(features.index[chosen], dtype="string"),
            "dominant_cause": truth_chosen,
            "probability": probabilities[chosen],
            **{f"ours_{k + 1}": ours[:, k] for k in range(ours.shape[1])},
            **{f"treeshap_{k + 1}": shap[:, k] for k in range(shap.shape[1])},
        }
    )
    return ReasonQuality(
        as_of=as_of,
        open_postings=len(features),
        medium_high=int(risky.sum()),
        summary=summary,
        per_cause=per_cause,
        evaluated=evaluated,
    )


def truth_moment(history_dir: str | Path, tables: HistoryTables) -> pd.Timestamp:
    """The moment the truth is for: ``truth.csv``'s ``as_of``, else the history's latest event."""
    truth = load_truth(history_dir)
    if truth is not None and len(truth):
        return pd.Timestamp(truth["as_of"].max())
    latest = tables.latest_event_at()
    if latest is None:
        raise TruthCausesError(f"{history_dir} has no timestamp to evaluate the reasons at")
    return pd.Timestamp(latest)


def evaluate_history_reasons(
    model: RiskModel, tables: HistoryTables, history_dir: str | Path
) -> ReasonQuality:
    """:func:`evaluate_reasons` on a history directory's own truth, at its moment."""
    return evaluate_reasons(
        model, tables, load_truth_causes(history_dir), truth_moment(history_dir, tables)
    )


def log_reason_quality(quality: ReasonQuality, prefix: str = "reasons") -> None:
    """Log :meth:`ReasonQuality.metrics` into the active MLflow run as ``<prefix>/<name>``,
    and the per-cause table as ``evaluation/reason_quality.csv``."""
    import mlflow

    from training.registry import log_metric_group

    log_metric_group(prefix, quality.metrics())
    mlflow.log_text(quality.per_cause.to_csv(index=False), "evaluation/reason_quality.csv")
