"""The causes a seller can act on, and how much fixing each would lower an order's risk.

Each cause (:data:`CAUSES`) is a rule on the model matrix: when it applies to an order, and the
order's features with the cause fixed, set to their "no problem" values (price unchanged, scans
up to date, on time, card untouched, ...). :func:`risk_drop_matrix` scores the fixed variants of
a batch's orders in one booster call and reports, per order and cause, the drop in calibrated
probability; :mod:`core.explain` ranks the drops into an order's reasons. The buyer-profile and
carrier fixes compare with the typical order of the training data (:func:`build_reference_values`,
stored with the model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from core.model import RiskModel

CAUSES = (
    "price_drop",
    "late_delivery",
    "tracking_quiet",
    "not_shipped",
    "listing_changed",
    "buyer_profile",
    "early_remorse",
    "slow_carrier",
)


# --- counterfactuals ---------------------------------------------------------------------------


class NamedMatrix:
    """Named access to the columns of a model matrix (rows: orders, columns: features)."""

    def __init__(self, matrix: np.ndarray, positions: Mapping[str, int]):
        self.values = matrix
        self.positions = positions

    def __getitem__(self, column: str) -> np.ndarray:
        return self.values[:, self.positions[column]]

    def __setitem__(self, column: str, values: np.ndarray | float) -> None:
        self.values[:, self.positions[column]] = values


# Comparisons where an unknown (NaN) value never meets the bound, as IEEE comparisons already do.
def gt(x: np.ndarray, bound: float) -> np.ndarray:
    return np.greater(x, bound)


def lt(x: np.ndarray, bound: float) -> np.ndarray:
    return np.less(x, bound)


@dataclass(frozen=True)
class Cause:
    """When a cause applies to an order, and the order's features with the cause fixed."""

    code: str
    applies: Callable[[NamedMatrix, Mapping[str, float]], np.ndarray]
    fix: Callable[[NamedMatrix, Mapping[str, float]], None]


def _price_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    return (
        lt(m["price_change_pct"], -0.5)
        | lt(m["lowest_price_change_pct"], -0.5)
        | gt(m["promotion_since_purchase"], 0)
    )


def _price_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    m["price_change_pct"] = np.fmax(m["price_change_pct"], 0.0)
    m["lowest_price_change_pct"] = np.fmax(m["lowest_price_change_pct"], 0.0)
    m["price_changes_since_purchase"] = 0.0
    m["promotion_since_purchase"] = 0.0


def _late_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    return lt(m["hours_to_promised_delivery_end"], 24.0) | gt(m["delivery_date_changes"], 0)


def _late_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    m["hours_to_promised_delivery_end"] = np.fmax(m["hours_to_promised_delivery_end"], 72.0)
    m["delivery_date_changes"] = 0.0
    m["delivery_date_shift_hours"] = 0.0


def _quiet_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    # Quiet now, or stuck for a while since the handover (the parcel barely moved meanwhile).
    quiet = gt(m["hours_since_last_activity"], 48.0) | gt(m["silent_hours_since_handover"], 0)
    return gt(m["is_handed_over"], 0.5) & quiet


def _quiet_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    # Tracking that kept moving: a recent update and no silence since the handover.
    m["hours_since_last_activity"] = np.fmin(m["hours_since_last_activity"], 12.0)
    m["hours_since_last_scan"] = np.where(
        np.isnan(m["hours_since_last_scan"]), np.nan, np.fmin(m["hours_since_last_scan"], 12.0)
    )
    silent = m["silent_hours_since_handover"]
    m["silent_hours_since_handover"] = np.where(np.isnan(silent), np.nan, 0.0)


def _not_shipped_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    return lt(m["is_handed_over"], 0.5) & gt(m["hours_since_order"], 48.0)


def _not_shipped_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    # Shipped a day after the order, with its first scan half a day ago.
    m["is_handed_over"] = 1.0
    m["hours_since_handover"] = np.fmax(m["hours_since_order"] - 24.0, 1.0)
    m["hours_since_last_activity"] = np.fmin(m["hours_since_last_activity"], 12.0)


def _listing_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    return gt(m["card_edits_since_purchase"], 0)


def _listing_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    m["card_edits_since_purchase"] = 0.0
    m["hours_since_last_card_edit"] = np.nan


def _buyer_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    applies = gt(m["buyer_earlier_buyer_cancels"], 0) | (m["buyer_earlier_postings"] == 0)
    for column in ("payment_type", "region"):
        if column in ref:
            applies |= ~np.isnan(m[column]) & (m[column] != ref[column])
    return applies


def _buyer_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    # The typical buyer: returning, no earlier cancellations, the usual payment and region.
    m["buyer_earlier_buyer_cancels"] = 0.0
    m["buyer_earlier_postings"] = np.fmax(m["buyer_earlier_postings"], 1.0)
    for column in ("payment_type", "region", "region_buyer_cancel_rate"):
        if column in ref:
            m[column] = ref[column]


def _remorse_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    return lt(m["hours_since_order"], 48.0)


def _remorse_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    m["hours_since_order"] = 48.0


def _carrier_applies(m: NamedMatrix, ref: Mapping[str, float]) -> np.ndarray:
    if "carrier_buyer_cancel_rate" not in ref:
        return np.zeros(len(m.values), dtype=bool)
    return gt(m["carrier_buyer_cancel_rate"], ref["carrier_buyer_cancel_rate"])


def _carrier_fix(m: NamedMatrix, ref: Mapping[str, float]) -> None:
    # The shop's usual carrier with its usual record and promise.
    for column in ("carrier", "carrier_buyer_cancel_rate", "promised_lead_time_hours"):
        if column in ref:
            m[column] = ref[column]


CAUSE_RULES = (
    Cause("price_drop", _price_applies, _price_fix),
    Cause("late_delivery", _late_applies, _late_fix),
    Cause("tracking_quiet", _quiet_applies, _quiet_fix),
    Cause("not_shipped", _not_shipped_applies, _not_shipped_fix),
    Cause("listing_changed", _listing_applies, _listing_fix),
    Cause("buyer_profile", _buyer_applies, _buyer_fix),
    Cause("early_remorse", _remorse_applies, _remorse_fix),
    Cause("slow_carrier", _carrier_applies, _carrier_fix),
)


# The typical order the buyer-profile and carrier counterfactuals compare with.
REFERENCE_COLUMNS = (
    "payment_type",
    "region",
    "region_buyer_cancel_rate",
    "carrier",
    "carrier_buyer_cancel_rate",
    "promised_lead_time_hours",
)


def build_reference_values(
    training_rows: pd.DataFrame, categorical_columns: tuple[str, ...] | list[str]
) -> dict[str, str | float]:
    """Most frequent level (categorical) or median (numeric) of each reference column.

    The rate of the usual carrier (region) is that carrier's own rate at the latest training
    moment: a median over all moments would mix in its first weeks, when cancellations (resolved
    in days) had come in and deliveries (weeks) had not, and make every carrier look better than
    the usual one. Learned in training, stored with the model (``metadata["reference_values"]``).
    """
    reference: dict[str, str | float] = {}
    for column in REFERENCE_COLUMNS:
        if column not in training_rows.columns:
            continue
        values = training_rows[column].dropna()
        if values.empty:
            continue
        if column in categorical_columns:
            counts = values.astype("string").value_counts()
            reference[column] = str(counts.sort_index().idxmax())
        else:
            reference[column] = float(values.astype("float64").median())
    for rate, level in REFERENCE_RATES.items():
        latest = _latest_rate(training_rows, rate, level, reference.get(level))
        if latest is not None:
            reference[rate] = latest
    return reference


# Rates that belong to a reference level: the usual carrier's and the usual region's record.
REFERENCE_RATES = {"carrier_buyer_cancel_rate": "carrier", "region_buyer_cancel_rate": "region"}


def _latest_rate(training_rows: pd.DataFrame, rate: str, level: str, usual: object) -> float | None:
    """``rate`` of the rows of level ``usual`` at the latest moment that has it (None: none)."""
    if usual is None or not {rate, level, "as_of"} <= set(training_rows.columns):
        return None
    rows = training_rows[
        (training_rows[level].astype("string") == usual).to_numpy(dtype=bool, na_value=False)
    ]
    rows = rows[rows[rate].notna().to_numpy()]
    if rows.empty:
        return None
    latest = rows[(rows["as_of"] == rows["as_of"].max()).to_numpy()]
    return float(latest[rate].astype("float64").median())


def reference_codes(model: RiskModel) -> dict[str, float]:
    """The typical order's values the buyer-profile counterfactual uses, in matrix encoding.

    Categorical references are the most frequent level in training (stored with the model as
    ``metadata["reference_values"]``); a model without them simply leaves those columns alone.
    """
    reference = model.metadata.get("reference_values", {}) or {}
    codes: dict[str, float] = {}
    for column, value in reference.items():
        if column not in model.feature_columns or value is None:
            continue
        levels = model.category_levels.get(column)
        if levels is None:
            codes[column] = float(value)
        elif str(value) in levels:
            codes[column] = float(levels.index(str(value)))
    return codes


def build_risk_drops(
    model: RiskModel, features: pd.DataFrame, probabilities: np.ndarray | None = None
) -> pd.DataFrame:
    """How much each applicable cause would lower each order's calibrated probability.

    Returns a frame with one column per cause (NaN where the cause does not apply), aligned
    with ``features``. All counterfactual rows are scored in one booster call.
    """
    matrix = model.build_matrix(features)
    raw = model.predict_matrix_raw(matrix)
    if probabilities is None:
        probabilities = model.calibrator.transform(raw)
    drops = risk_drop_matrix(model, matrix, raw, np.asarray(probabilities, dtype="float64"))
    return pd.DataFrame(drops, index=features.index, columns=list(CAUSES))


def risk_drop_matrix(
    model: RiskModel,
    matrix: np.ndarray,
    raw: np.ndarray,
    probabilities: np.ndarray,
    reference: Mapping[str, float] | None = None,
) -> np.ndarray:
    """:func:`build_risk_drops` on the model matrix: rows x :data:`CAUSES`, NaN where a cause
    does not apply. ``raw`` is the booster's score of ``matrix``; ``reference`` the typical
    order's values in matrix encoding (:func:`reference_codes`, looked up when not given)."""
    reference = reference_codes(model) if reference is None else reference
    positions = {c: i for i, c in enumerate(model.feature_columns)}
    base = NamedMatrix(matrix, positions)
    blocks, owners = [], []
    for cause in CAUSE_RULES:
        rows = np.flatnonzero(cause.applies(base, reference))
        if rows.size == 0:
            continue
        variant = NamedMatrix(matrix[rows].copy(), positions)
        cause.fix(variant, reference)
        blocks.append(variant.values)
        owners.append((CAUSES.index(cause.code), rows))
    fixed = score_variants(model, blocks, owners, raw, probabilities, len(CAUSES))
    return probabilities[:, None] - fixed


def no_problem_probabilities(
    model: RiskModel,
    matrix: np.ndarray,
    raw: np.ndarray,
    probabilities: np.ndarray,
    reference: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Each order's calibrated probability with every cause that applies to it fixed at once:
    the order with no problem the seller could act on, what a reason's share is measured
    against (:func:`core.explain.log_odds_share`). An order no cause applies to keeps its own
    probability. One booster call."""
    reference = reference_codes(model) if reference is None else reference
    positions = {c: i for i, c in enumerate(model.feature_columns)}
    base = NamedMatrix(matrix, positions)
    variant = matrix.copy()
    touched = np.zeros(len(matrix), dtype=bool)
    for cause in CAUSE_RULES:
        rows = np.flatnonzero(cause.applies(base, reference))
        if rows.size == 0:
            continue
        part = NamedMatrix(variant[rows], positions)
        cause.fix(part, reference)
        variant[rows] = part.values
        touched[rows] = True
    rows = np.flatnonzero(touched)
    fixed = score_variants(model, [variant[rows]], [(0, rows)], raw, probabilities, 1)[:, 0]
    return np.where(touched, fixed, probabilities)


def score_variants(
    model: RiskModel,
    blocks: Sequence[np.ndarray],
    owners: Sequence[tuple[int, np.ndarray]],
    raw: np.ndarray,
    probabilities: np.ndarray,
    width: int,
) -> np.ndarray:
    """The calibrated probabilities of variant rows, scored in one booster call: ``blocks[k]``
    holds variants of the orders ``owners[k][1]``, for column ``owners[k][0]`` of the result
    (orders x ``width``, NaN where an order has no variant), each moved from the order's own
    probability by the booster's change in log-odds (:func:`shift_log_odds`)."""
    fixed = np.full((len(probabilities), width), np.nan)
    if not blocks:
        return fixed
    fixed_raw = model.predict_matrix_raw(np.vstack(blocks))
    start = 0
    for column, rows in owners:
        fixed[rows, column] = shift_log_odds(
            probabilities[rows], raw[rows], fixed_raw[start : start + rows.size]
        )
        start += rows.size
    return fixed


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return np.log(p) - np.log1p(-p)


def shift_log_odds(calibrated: np.ndarray, raw: np.ndarray, raw_fixed: np.ndarray) -> np.ndarray:
    """The calibrated probability moved by the booster's change in log-odds.

    The isotonic calibrator is flat within its bins, so passing the counterfactual raw score
    through it would report no change for many real changes; moving the calibrated log-odds by
    the booster's own shift keeps every change and agrees with the calibrator where it is smooth.
    """
    shifted = _logit(calibrated) + _logit(raw_fixed) - _logit(raw)
    return 1.0 / (1.0 + np.exp(-shifted))
