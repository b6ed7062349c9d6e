"""Why an order is at risk, what the seller should do, and whether it pays to act.

Reasons are **counterfactual**: for each seller-facing cause that applies to an order, its
features are set to their "no problem" values (price unchanged, scans up to date, on time, card
untouched, ...) and the model scores the order again. The drop in calibrated probability is how
much fixing that cause would help — the seller's real question — and ranks the causes. Only the
causes that apply to an order are re-scored, and all of a batch's variants go through the
booster in one call, so a reason costs about one extra predict per applicable cause (TreeSHAP
would cost milliseconds per row and answer a less useful question: see the README's figures).

``share`` is the reason's drop over the order's probability: the part of this order's risk that
fixing the cause would remove. Shares of several causes need not add up to one (causes interact).

The playbook (``playbook.yaml``, editable by the seller) maps each cause to its title, the facts
shown and the actions, in English, Chinese and Russian.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    from training.config import CostsConfig
    from training.model import RiskModel

logger = logging.getLogger(__name__)

LANGUAGES = ("en", "zh", "ru")
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
DECISIONS = ("ship", "contact_buyer", "hold_and_confirm")
MAX_REASONS = 3
# A cause must remove at least this much probability to be named: noise is not a reason.
MIN_RISK_DROP = 0.002


# --- the playbook ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Texts(_Strict):
    en: str
    zh: str
    ru: str

    def get(self, lang: str) -> str:
        return getattr(self, lang)


class CauseEntry(_Strict):
    title: Texts
    facts: dict[str, Texts]
    actions: list[Texts]


class Playbook(_Strict):
    causes: dict[str, CauseEntry]
    decisions: dict[str, Texts]

    @model_validator(mode="after")
    def _complete(self) -> Playbook:
        missing = [c for c in CAUSES if c not in self.causes]
        unknown = [c for c in self.causes if c not in CAUSES]
        if missing or unknown:
            raise ValueError(f"playbook causes: missing {missing}, unknown {unknown}")
        missing_decisions = [d for d in DECISIONS if d not in self.decisions]
        if missing_decisions:
            raise ValueError(f"playbook decisions missing: {missing_decisions}")
        for cause, fact_names in FACTS.items():
            absent = [name for name in fact_names if name not in self.causes[cause].facts]
            if absent:
                raise ValueError(f"playbook cause {cause!r} lacks the facts {absent}")
        return self


def load_playbook(path: str | Path | None = None) -> Playbook:
    """The playbook at ``path``, or the one shipped with the package."""
    if path is None:
        return _default_playbook()
    try:
        return _parse_playbook(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"playbook {path} is not usable: {exc}") from None


@cache
def _default_playbook() -> Playbook:
    text = resources.files("training").joinpath("playbook.yaml").read_text(encoding="utf-8")
    return _parse_playbook(text)


def _parse_playbook(text: str) -> Playbook:
    return Playbook.model_validate(yaml.safe_load(text))


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reason:
    code: str
    share: float  # risk_drop / probability
    risk_drop: float  # calibrated probability removed if the cause were fixed
    facts: str  # in the requested language
    values: dict[str, float]  # the numbers behind the facts


@dataclass(frozen=True)
class Explanation:
    reasons: tuple[Reason, ...]
    actions: tuple[str, ...]
    decision: str
    expected_saving: float


# --- counterfactuals ---------------------------------------------------------------------------


class _Matrix:
    """Named access to the columns of a model matrix (rows: orders, columns: features)."""

    def __init__(self, matrix: np.ndarray, positions: Mapping[str, int]):
        self.values = matrix
        self.positions = positions

    def __getitem__(self, column: str) -> np.ndarray:
        return self.values[:, self.positions[column]]

    def __setitem__(self, column: str, values: np.ndarray | float) -> None:
        self.values[:, self.positions[column]] = values


# Comparisons where an unknown (NaN) value never meets the bound, as IEEE comparisons already do.
def _gt(x: np.ndarray, bound: float) -> np.ndarray:
    return np.greater(x, bound)


def _lt(x: np.ndarray, bound: float) -> np.ndarray:
    return np.less(x, bound)


@dataclass(frozen=True)
class Cause:
    """When a cause applies to an order, and the order's features with the cause fixed."""

    code: str
    applies: Callable[[_Matrix, Mapping[str, float]], np.ndarray]
    fix: Callable[[_Matrix, Mapping[str, float]], None]


def _price_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    return (
        _lt(m["price_change_pct"], -0.5)
        | _lt(m["lowest_price_change_pct"], -0.5)
        | _gt(m["promotion_since_purchase"], 0)
    )


def _price_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
    m["price_change_pct"] = np.fmax(m["price_change_pct"], 0.0)
    m["lowest_price_change_pct"] = np.fmax(m["lowest_price_change_pct"], 0.0)
    m["price_changes_since_purchase"] = 0.0
    m["promotion_since_purchase"] = 0.0


def _late_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    return _lt(m["hours_to_promised_delivery_end"], 24.0) | _gt(m["delivery_date_changes"], 0)


def _late_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
    m["hours_to_promised_delivery_end"] = np.fmax(m["hours_to_promised_delivery_end"], 72.0)
    m["delivery_date_changes"] = 0.0
    m["delivery_date_shift_hours"] = 0.0


def _quiet_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    # Quiet now, or stuck for a while since the handover (the parcel barely moved meanwhile).
    quiet = _gt(m["hours_since_last_activity"], 48.0) | _gt(m["silent_hours_since_handover"], 0)
    return _gt(m["is_handed_over"], 0.5) & quiet


def _quiet_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
    # Tracking that kept moving: a recent update and no silence since the handover.
    m["hours_since_last_activity"] = np.fmin(m["hours_since_last_activity"], 12.0)
    m["hours_since_last_scan"] = np.where(
        np.isnan(m["hours_since_last_scan"]), np.nan, np.fmin(m["hours_since_last_scan"], 12.0)
    )
    silent = m["silent_hours_since_handover"]
    m["silent_hours_since_handover"] = np.where(np.isnan(silent), np.nan, 0.0)


def _not_shipped_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    return _lt(m["is_handed_over"], 0.5) & _gt(m["hours_since_order"], 48.0)


def _not_shipped_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
    # Shipped a day after the order, with its first scan half a day ago.
    m["is_handed_over"] = 1.0
    m["hours_since_handover"] = np.fmax(m["hours_since_order"] - 24.0, 1.0)
    m["hours_since_last_activity"] = np.fmin(m["hours_since_last_activity"], 12.0)


def _listing_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    return _gt(m["card_edits_since_purchase"], 0)


def _listing_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
    m["card_edits_since_purchase"] = 0.0
    m["hours_since_last_card_edit"] = np.nan


def _buyer_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    applies = _gt(m["buyer_earlier_buyer_cancels"], 0) | (m["buyer_earlier_postings"] == 0)
    for column in ("payment_type", "region"):
        if column in ref:
            applies |= ~np.isnan(m[column]) & (m[column] != ref[column])
    return applies


def _buyer_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
    # The typical buyer: returning, no earlier cancellations, the usual payment and region.
    m["buyer_earlier_buyer_cancels"] = 0.0
    m["buyer_earlier_postings"] = np.fmax(m["buyer_earlier_postings"], 1.0)
    for column in ("payment_type", "region", "region_buyer_cancel_rate"):
        if column in ref:
            m[column] = ref[column]


def _remorse_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    return _lt(m["hours_since_order"], 48.0)


def _remorse_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
    m["hours_since_order"] = 48.0


def _carrier_applies(m: _Matrix, ref: Mapping[str, float]) -> np.ndarray:
    if "carrier_buyer_cancel_rate" not in ref:
        return np.zeros(len(m.values), dtype=bool)
    return _gt(m["carrier_buyer_cancel_rate"], ref["carrier_buyer_cancel_rate"])


def _carrier_fix(m: _Matrix, ref: Mapping[str, float]) -> None:
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

    Learned in training and stored with the model (``metadata["reference_values"]``).
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
    return reference


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
    base = _Matrix(matrix, positions)
    blocks, owners = [], []
    for cause in CAUSE_RULES:
        rows = np.flatnonzero(cause.applies(base, reference))
        if rows.size == 0:
            continue
        variant = _Matrix(matrix[rows].copy(), positions)
        cause.fix(variant, reference)
        blocks.append(variant.values)
        owners.append((CAUSES.index(cause.code), rows))
    drops = np.full((len(matrix), len(CAUSES)), np.nan)
    if not blocks:
        return drops
    fixed_raw = model.predict_matrix_raw(np.vstack(blocks))
    start = 0
    for column, rows in owners:
        fixed = _shift_log_odds(
            probabilities[rows], raw[rows], fixed_raw[start : start + rows.size]
        )
        drops[rows, column] = probabilities[rows] - fixed
        start += rows.size
    return drops


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return np.log(p) - np.log1p(-p)


def _shift_log_odds(calibrated: np.ndarray, raw: np.ndarray, raw_fixed: np.ndarray) -> np.ndarray:
    """The calibrated probability moved by the booster's change in log-odds.

    The isotonic calibrator is flat within its bins, so passing the counterfactual raw score
    through it would report no change for many real changes; moving the calibrated log-odds by
    the booster's own shift keeps every change and agrees with the calibrator where it is smooth.
    """
    shifted = _logit(calibrated) + _logit(raw_fixed) - _logit(raw)
    return 1.0 / (1.0 + np.exp(-shifted))


# --- facts -------------------------------------------------------------------------------------

FACTS: dict[str, tuple[str, ...]] = {
    "price_drop": ("cheaper",),
    "late_delivery": ("late", "due", "moved"),
    "tracking_quiet": ("quiet", "stalled"),
    "not_shipped": ("waiting",),
    "listing_changed": ("edited",),
    "buyer_profile": ("payment", "earlier_cancels", "first_time", "region"),
    "early_remorse": ("recent",),
    "slow_carrier": ("record",),
}


# The feature columns the facts quote: numbers, and names shown as they are.
FACT_NUMBER_COLUMNS = (
    "price_change_pct",
    "lowest_price_change_pct",
    "hours_to_promised_delivery_end",
    "delivery_date_changes",
    "hours_since_last_activity",
    "silent_hours_since_handover",
    "hours_since_order",
    "card_edits_since_purchase",
    "buyer_earlier_buyer_cancels",
    "buyer_earlier_postings",
    "carrier_buyer_cancel_rate",
)
FACT_TEXT_COLUMNS = ("payment_type", "region", "carrier")


def fact_values(
    numbers: Mapping[str, np.ndarray], texts: Mapping[str, Sequence[object]]
) -> list[dict[str, float | str]]:
    """The values the fact templates quote, one dict per row, computed column by column.

    ``numbers`` holds :data:`FACT_NUMBER_COLUMNS` as float arrays (NaN: unknown), ``texts``
    holds :data:`FACT_TEXT_COLUMNS` as sequences of strings (None or NA: unknown, shown "?").
    """
    price_now = numbers["price_change_pct"]
    to_promise = numbers["hours_to_promised_delivery_end"]
    hours_since_order = numbers["hours_since_order"]
    overdue_days = -to_promise / 24.0
    columns: dict[str, np.ndarray | list] = {
        "price_pct": np.where(_lt(price_now, -0.5), price_now, numbers["lowest_price_change_pct"]),
        "days_late": np.where(  # max(0, overdue) as Python's max gives it: never -0.0
            np.isnan(to_promise), np.nan, np.where(overdue_days > 0.0, overdue_days, 0.0)
        ),
        "days_to_promise": to_promise / 24.0,
        "date_changes": numbers["delivery_date_changes"],
        "quiet_days": numbers["hours_since_last_activity"] / 24.0,
        "silent_days": numbers["silent_hours_since_handover"] / 24.0,
        "days_since_order": hours_since_order / 24.0,
        "hours_since_order": hours_since_order,
        "edits": numbers["card_edits_since_purchase"],
        "earlier_cancels": numbers["buyer_earlier_buyer_cancels"],
        "earlier_postings": numbers["buyer_earlier_postings"],
        "payment": _shown(texts["payment_type"]),
        "region": _shown(texts["region"]),
        "carrier": _shown(texts["carrier"]),
        "carrier_cancel_pct": 100.0 * numbers["carrier_buyer_cancel_rate"],
    }
    names = list(columns)
    values = [
        column.tolist() if isinstance(column, np.ndarray) else column for column in columns.values()
    ]
    return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]


def frame_fact_values(features: pd.DataFrame) -> list[dict[str, float | str]]:
    """:func:`fact_values` of the rows of a feature frame."""
    return fact_values(
        {c: features[c].to_numpy(dtype="float64", na_value=np.nan) for c in FACT_NUMBER_COLUMNS},
        {c: features[c].tolist() for c in FACT_TEXT_COLUMNS},
    )


def _shown(names: Sequence[object]) -> list[str]:
    return [name if isinstance(name, str) and name else "?" for name in names]


def _quoted_numbers(values: Mapping[str, float | str]) -> dict[str, float]:
    """The known numbers among a row's fact values (a reason's ``values``)."""
    return {k: v for k, v in values.items() if isinstance(v, float) and v == v}


def _facts_that_hold(
    cause: str, values: Mapping[str, float | str], reference: Mapping[str, str]
) -> list[str]:
    if cause == "tracking_quiet":
        # Quiet now says it all; moving again after a silence, the silence is the fact.
        return ["quiet" if values["quiet_days"] > 2.0 else "stalled"]
    if cause == "late_delivery":
        held = ["late" if values["days_late"] > 0 else "due"]
        return held + (["moved"] if values["date_changes"] > 0 else [])
    if cause == "buyer_profile":
        held = []
        if "payment_type" not in reference or values["payment"] != reference["payment_type"]:
            held.append("payment")
        if values["earlier_cancels"] > 0:
            held.append("earlier_cancels")
        if values["earlier_postings"] == 0:
            held.append("first_time")
        if "region" in reference and values["region"] != reference["region"]:
            held.append("region")
        return held or ["payment"]
    return list(FACTS[cause])


def describe_reason(
    cause: str,
    values: Mapping[str, float | str],
    lang: str,
    playbook: Playbook,
    reference: Mapping[str, str],
) -> str:
    """The facts behind ``cause`` for one order (its :func:`fact_values`), as text in ``lang``."""
    entry = playbook.causes[cause]
    return "; ".join(
        entry.facts[name].get(lang).format_map(values)
        for name in _facts_that_hold(cause, values, reference)
    )


# --- decisions ---------------------------------------------------------------------------------


def build_decisions(
    probabilities: np.ndarray, handed_over: np.ndarray, costs: CostsConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The action with the lowest expected cost per order, and what it saves over shipping.

    Saving of an action ``a`` at probability ``p``: ``p · effect_a · cancelled_order_cost −
    cost_a``. ``hold_and_confirm`` is only possible before the handover.
    """
    p = np.nan_to_num(np.asarray(probabilities, dtype="float64"))
    scale = costs.cancelled_order_cost
    savings = np.column_stack(
        [
            np.zeros_like(p),
            p * costs.contact_effect * scale - costs.contact_cost,
            np.where(
                np.asarray(handed_over, dtype="float64") > 0.5,
                -np.inf,
                p * costs.hold_effect * scale - costs.hold_cost,
            ),
        ]
    )
    best = savings.argmax(axis=1)
    return np.array(DECISIONS, dtype=object)[best], savings[np.arange(len(p)), best]


def model_costs(model: RiskModel) -> CostsConfig:
    """The costs the model's thresholds were chosen with (the defaults for an older model)."""
    from training.config import CostsConfig

    return CostsConfig(**(model.metadata.get("costs") or {}))


# --- the whole explanation ---------------------------------------------------------------------


def build_explanations(
    model: RiskModel,
    features: pd.DataFrame,
    probabilities: np.ndarray,
    *,
    lang: str = "en",
    playbook: Playbook | None = None,
    costs: CostsConfig | None = None,
    with_reasons: np.ndarray | None = None,
) -> list[Explanation]:
    """Reasons (at most three, only causes that raise the risk), actions and a decision per row.

    ``with_reasons`` (boolean per row) limits the counterfactual work to the rows that need
    reasons, e.g. medium and high risk in a nightly batch; the others get the decision only.
    """
    explainer = Explainer(model, playbook=playbook, costs=costs)
    probabilities = np.asarray(probabilities, dtype="float64")
    rows = np.arange(len(features)) if with_reasons is None else np.flatnonzero(with_reasons)
    part = features.iloc[rows]
    matrix = model.build_matrix(part)
    drops = explainer.risk_drops(matrix, model.predict_matrix_raw(matrix), probabilities[rows])
    ranked: list[list[tuple[int, float]]] = [[] for _ in range(len(features))]
    for row, causes in zip(rows.tolist(), rank_causes(drops), strict=True):
        ranked[row] = causes
    return explainer.explain(
        probabilities,
        features["is_handed_over"].to_numpy(dtype="float64", na_value=0.0),
        ranked,
        lambda explained: frame_fact_values(features.iloc[explained]),
        lang,
    )


class Explainer:
    """One model's explanations: what the batch, the report and the REST service all run.

    Rows come as the model matrix (for the counterfactuals) and, for the rows that get
    reasons, their :func:`fact_values` (for the texts), so a caller holding rows as dicts and
    one holding a feature frame share every step.
    """

    def __init__(
        self, model: RiskModel, playbook: Playbook | None = None, costs: CostsConfig | None = None
    ) -> None:
        self.model = model
        self.playbook = playbook or load_playbook()
        self.costs = costs or model_costs(model)
        self.reference_codes = reference_codes(model)
        self.reference = {
            k: str(v)
            for k, v in (model.metadata.get("reference_values") or {}).items()
            if v is not None
        }

    def risk_drops(
        self, matrix: np.ndarray, raw: np.ndarray, probabilities: np.ndarray
    ) -> np.ndarray:
        return risk_drop_matrix(self.model, matrix, raw, probabilities, self.reference_codes)

    def explain(
        self,
        probabilities: np.ndarray,
        handed_over: np.ndarray,
        ranked: Sequence[Sequence[tuple[int, float]]],
        values_of: Callable[[np.ndarray], list[dict[str, float | str]]],
        lang: str,
    ) -> list[Explanation]:
        """Explanations of rows whose causes are ranked (:func:`rank_causes`, empty: none).

        ``values_of`` gives the :func:`fact_values` of the rows at the positions it is given:
        only the rows with reasons need them.
        """
        if lang not in LANGUAGES:
            raise ValueError(f"lang must be one of {LANGUAGES}, not {lang!r}")
        decisions, savings = build_decisions(probabilities, handed_over, self.costs)
        explained = np.flatnonzero([bool(causes) for causes in ranked])
        values = dict(zip(explained.tolist(), values_of(explained), strict=True))
        actions_of: dict[tuple[tuple[str, ...], str], tuple[str, ...]] = {}
        explanations = []
        for i, (causes, decision, saving) in enumerate(
            zip(ranked, decisions.tolist(), savings.tolist(), strict=True)
        ):
            reasons = (
                self._reasons(causes, values[i], float(probabilities[i]), lang) if causes else ()
            )
            codes = tuple(reason.code for reason in reasons)
            actions = actions_of.get((codes, decision))
            if actions is None:
                actions = _actions(reasons, decision, lang, self.playbook)
                actions_of[(codes, decision)] = actions
            explanations.append(Explanation(reasons, actions, decision, round(saving, 4)))
        return explanations

    def _reasons(
        self,
        causes: Sequence[tuple[int, float]],
        values: Mapping[str, float | str],
        probability: float,
        lang: str,
    ) -> tuple[Reason, ...]:
        numbers = _quoted_numbers(values)
        reasons = []
        for cause_index, drop in causes:
            code = CAUSES[cause_index]
            facts = describe_reason(code, values, lang, self.playbook, self.reference)
            share = drop / probability if probability > 0 else 0.0
            reasons.append(Reason(code, round(share, 4), round(drop, 6), facts, dict(numbers)))
        return tuple(reasons)


def rank_causes(drops: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per row, up to MAX_REASONS (cause index, drop) with a real drop, largest first."""
    clean = np.nan_to_num(drops, nan=-np.inf)
    order = np.argsort(-clean, axis=1, kind="stable")[:, :MAX_REASONS]
    top = np.take_along_axis(clean, order, axis=1)
    named = top >= MIN_RISK_DROP
    return [
        [(cause, drop) for cause, drop, keep in zip(o, t, k, strict=True) if keep]
        for o, t, k in zip(order.tolist(), top.tolist(), named.tolist(), strict=True)
    ]


MAX_ACTIONS = 4


def _actions(
    reasons: tuple[Reason, ...], decision: str, lang: str, playbook: Playbook
) -> tuple[str, ...]:
    """The decision, then each reason's first action, then their second ones; no repeats.

    A seller acts on a few things: at most MAX_ACTIONS, the most important first.
    """
    chosen: dict[str, None] = {}
    if decision != "ship":
        chosen[playbook.decisions[decision].get(lang)] = None
    depth = max((len(playbook.causes[r.code].actions) for r in reasons), default=0)
    for level in range(depth):
        for reason in reasons:
            actions = playbook.causes[reason.code].actions
            if level < len(actions):
                chosen.setdefault(actions[level].get(lang), None)
    return tuple(chosen)[:MAX_ACTIONS]


def explanation_to_dict(explanation: Explanation) -> dict:
    """A JSON-ready form (used by the REST service and the batch output)."""
    return {
        "reasons": [
            {"code": r.code, "share": r.share, "risk_drop": r.risk_drop, "facts": r.facts}
            for r in explanation.reasons
        ],
        "actions": list(explanation.actions),
        "decision": explanation.decision,
        "expected_saving": explanation.expected_saving,
    }
