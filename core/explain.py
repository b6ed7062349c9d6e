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

import itertools
import logging
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

if TYPE_CHECKING:
    from core.costs import CostsConfig
    from core.model import RiskModel

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
# The reason of a medium- or high-risk order that no single cause explains: its risk is that of
# orders like it (carrier, region, payment), and no one fix would remove a noticeable part of it.
NO_SINGLE_CAUSE = "no_single_cause"
REASON_CODES = (*CAUSES, NO_SINGLE_CAUSE)
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
    # Absent from a playbook written before it existed: the shipped playbook's entry is used.
    no_single_cause: CauseEntry | None = None

    def entry(self, code: str) -> CauseEntry:
        """The entry of a reason code: a cause, or :data:`NO_SINGLE_CAUSE`."""
        if code != NO_SINGLE_CAUSE:
            return self.causes[code]
        return self.no_single_cause or _default_playbook().entry(code)

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
            entry = self.causes.get(cause) if cause in CAUSES else self.no_single_cause
            absent = [name for name in fact_names if entry and name not in entry.facts]
            if absent:
                raise ValueError(f"playbook cause {cause!r} lacks the facts {absent}")
        self._check_templates()
        return self

    def _check_templates(self) -> None:
        """Fill every fact template with a sample order's values, so that a misspelt value name
        or format stops the playbook's loading, not a scoring run an hour later."""
        sample = {name: column[0] for name, column in _sample_fact_columns().items()}
        entries = {**self.causes, NO_SINGLE_CAUSE: self.no_single_cause}
        for cause, entry in entries.items():
            for fact, texts in entry.facts.items() if entry else ():
                for lang in LANGUAGES:
                    template = texts.get(lang)
                    try:
                        template.format_map(sample)
                    except KeyError as exc:
                        raise ValueError(
                            f"playbook cause {cause!r} fact {fact!r} ({lang}) quotes "
                            f"{{{exc.args[0]}}}, which is not a fact value; known: "
                            f"{', '.join(sample)}"
                        ) from None
                    except (ValueError, IndexError, AttributeError, TypeError) as exc:
                        raise ValueError(
                            f"playbook cause {cause!r} fact {fact!r} ({lang}): the template "
                            f"{template!r} cannot be filled ({exc})"
                        ) from None


def load_playbook(path: str | Path | None = None) -> Playbook:
    """The playbook at ``path``, or the one shipped with the package."""
    if path is None:
        return _default_playbook()
    try:
        return _parse_playbook(Path(path).read_text(encoding="utf-8"))
    except ValidationError as exc:
        problems = "; ".join(_describe_error(error) for error in exc.errors())
        raise ValueError(f"playbook {path} is not usable: {problems}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"playbook {path} is not usable: {exc}") from None


def _describe_error(error: Mapping[str, Any]) -> str:
    """One validation error as the seller reads it: where in the file, and what is wrong."""
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message


@cache
def _default_playbook() -> Playbook:
    text = resources.files("core").joinpath("playbook.yaml").read_text(encoding="utf-8")
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
    NO_SINGLE_CAUSE: ("profile",),
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

# The values the fact templates quote, by name: one list per name, a row per order.
FactColumns = dict[str, list]


def fact_columns(
    numbers: Mapping[str, np.ndarray], texts: Mapping[str, Sequence[object]]
) -> FactColumns:
    """The values the fact templates quote, computed column by column.

    ``numbers`` holds :data:`FACT_NUMBER_COLUMNS` as float arrays (NaN: unknown), ``texts``
    holds :data:`FACT_TEXT_COLUMNS` as sequences of strings (None or NA: unknown, shown "?").
    Numbers come out as Python floats, which the templates format.
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
    return {
        name: column.tolist() if isinstance(column, np.ndarray) else column
        for name, column in columns.items()
    }


@cache
def _sample_fact_columns() -> FactColumns:
    """The fact values of one made-up order: what a template is checked against."""
    return fact_columns(
        {column: np.ones(1) for column in FACT_NUMBER_COLUMNS},
        {column: ["sample"] for column in FACT_TEXT_COLUMNS},
    )


def frame_fact_columns(features: pd.DataFrame) -> FactColumns:
    """:func:`fact_columns` of the rows of a feature frame."""
    return fact_columns(
        {c: features[c].to_numpy(dtype="float64", na_value=np.nan) for c in FACT_NUMBER_COLUMNS},
        {c: features[c].tolist() for c in FACT_TEXT_COLUMNS},
    )


def row_fact_columns(rows: Sequence[Mapping[str, Any]]) -> FactColumns:
    """:func:`fact_columns` of feature rows held as dicts (missing numbers None or NaN)."""
    return fact_columns(
        {
            c: np.array([np.nan if row[c] is None else row[c] for row in rows], dtype="float64")
            for c in FACT_NUMBER_COLUMNS
        },
        {c: [row[c] for row in rows] for c in FACT_TEXT_COLUMNS},
    )


def _shown(names: Sequence[object]) -> list[str]:
    return [name if isinstance(name, str) and name else "?" for name in names]


def _quoted_numbers(columns: FactColumns, row: int) -> dict[str, float]:
    """The known numbers among a row's fact values (a reason's ``values``)."""
    return {
        name: value
        for name, column in columns.items()
        if isinstance(value := column[row], float) and value == value
    }


def _held_facts(
    cause: str, columns: FactColumns, rows: np.ndarray, reference: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """For each fact of ``cause`` (in the playbook's order), whether it holds at each row."""

    def numbers(name: str) -> np.ndarray:
        return np.asarray(columns[name], dtype="float64")[rows]

    def differs(name: str, reference_name: str) -> np.ndarray:
        if reference_name not in reference:
            return np.zeros(len(rows), dtype=bool)
        return np.asarray(columns[name], dtype=object)[rows] != reference[reference_name]

    if cause == "tracking_quiet":
        # Quiet now says it all; moving again after a silence, the silence is the fact.
        quiet = _gt(numbers("quiet_days"), 2.0)
        return {"quiet": quiet, "stalled": ~quiet}
    if cause == "late_delivery":
        late = _gt(numbers("days_late"), 0.0)
        return {"late": late, "due": ~late, "moved": _gt(numbers("date_changes"), 0.0)}
    if cause == "buyer_profile":
        held = {
            "payment": differs("payment", "payment_type") | ("payment_type" not in reference),
            "earlier_cancels": _gt(numbers("earlier_cancels"), 0.0),
            "first_time": numbers("earlier_postings") == 0.0,
            "region": differs("region", "region"),
        }
        held["payment"] |= ~np.logical_or.reduce(list(held.values()))  # the payment at least
        return held
    return {name: np.ones(len(rows), dtype=bool) for name in FACTS[cause]}


_FORMATTER = string.Formatter()


@cache
def _template_parts(template: str) -> tuple[tuple[str, str | None, str, str | None], ...] | None:
    """A template's literal texts and fields, or None when a field is more than a plain name
    (an attribute, an index, a nested format): such a template is formatted row by row."""
    parts = tuple(_FORMATTER.parse(template))
    for _, field, spec, _ in parts:
        if field is not None and (not field.isidentifier() or "{" in spec):
            return None
    return parts


_CONVERSIONS: dict[str | None, Callable[[object], object]] = {
    None: lambda value: value,
    "s": str,
    "r": repr,
    "a": ascii,
}


def format_rows(template: str, columns: FactColumns, rows: Sequence[int]) -> list[str]:
    """``template.format_map`` of the fact values of each row at ``rows``, field by field."""
    parts = _template_parts(template)
    if parts is None:
        return [template.format_map({k: v[row] for k, v in columns.items()}) for row in rows]
    pieces: list[Iterable[str]] = []
    for literal, field, spec, conversion in parts:
        if literal:
            pieces.append(itertools.repeat(literal, len(rows)))
        if field is not None:
            column, convert = columns[field], _CONVERSIONS[conversion]
            pieces.append([format(convert(column[row]), spec) for row in rows])
    return ["".join(texts) for texts in zip(*pieces, strict=True)] if pieces else [""] * len(rows)


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
    from core.costs import CostsConfig

    return CostsConfig(**(model.metadata.get("costs") or {}))


# --- the whole explanation ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExplanationColumns:
    """Explanations of many orders as columns: what the batch writes without a per-order object.

    Reasons fill the first slots of a row (largest drop first); the other slots hold None (codes,
    facts) and NaN (shares, drops). ``fact_values``/``fact_row`` keep the values the facts quote,
    for :meth:`to_explanations`.
    """

    codes: np.ndarray  # (orders, MAX_REASONS) reason codes
    shares: np.ndarray  # (orders, MAX_REASONS)
    risk_drops: np.ndarray  # (orders, MAX_REASONS)
    facts: np.ndarray  # (orders, MAX_REASONS) texts
    actions: list[tuple[str, ...]]
    decisions: list[str]
    savings: list[float]
    fact_values: FactColumns
    fact_row: np.ndarray  # per order: its row in fact_values, -1 when it has no reasons

    def reason_lists(self) -> list[list[dict[str, Any]]]:
        """Each order's JSON-ready reasons (the REST service's and the batch's shape), in row
        order: empty for an order without reasons."""
        none: list[dict[str, Any]] = []  # shared by the orders without reasons: never mutated
        listed = [none] * len(self.fact_row)
        rows = np.flatnonzero(self.fact_row >= 0)
        columns = (c[rows].tolist() for c in (self.codes, self.shares, self.risk_drops, self.facts))
        for row, *cells in zip(rows.tolist(), *columns, strict=True):
            listed[row] = [
                {"code": code, "share": share, "risk_drop": drop, "facts": text}
                for code, share, drop, text in zip(*cells, strict=True)
                if code is not None
            ]
        return listed

    def to_explanations(self) -> list[Explanation]:
        explanations = []
        for row, reasons in enumerate(self.reason_lists()):
            numbers = _quoted_numbers(self.fact_values, self.fact_row[row]) if reasons else {}
            explanations.append(
                Explanation(
                    tuple(
                        Reason(r["code"], r["share"], r["risk_drop"], r["facts"], dict(numbers))
                        for r in reasons
                    ),
                    self.actions[row],
                    self.decisions[row],
                    self.savings[row],
                )
            )
        return explanations


def build_explanations(
    model: RiskModel, features: pd.DataFrame, probabilities: np.ndarray, **options: Any
) -> list[Explanation]:
    """:func:`build_explanation_columns` (same options) as one :class:`Explanation` per row."""
    return build_explanation_columns(model, features, probabilities, **options).to_explanations()


def build_explanation_columns(
    model: RiskModel,
    features: pd.DataFrame,
    probabilities: np.ndarray,
    *,
    lang: str = "en",
    playbook: Playbook | None = None,
    costs: CostsConfig | None = None,
    with_reasons: np.ndarray | None = None,
) -> ExplanationColumns:
    """Reasons (at most three, only causes that raise the risk), actions and a decision per row.

    ``with_reasons`` (boolean per row) limits the counterfactual work to the rows that need
    reasons, e.g. medium and high risk in a nightly batch; the others get the decision only.
    A medium- or high-risk row that no single cause explains gets :data:`NO_SINGLE_CAUSE`.
    """
    explainer = Explainer(model, playbook=playbook, costs=costs)
    probabilities = np.asarray(probabilities, dtype="float64")
    rows = np.arange(len(features)) if with_reasons is None else np.flatnonzero(with_reasons)
    matrix = model.build_matrix(features.iloc[rows])
    return explainer.explain_matrix(
        probabilities,
        features["is_handed_over"].to_numpy(dtype="float64", na_value=0.0),
        rows,
        matrix,
        model.predict_matrix_raw(matrix),
        lambda explained: frame_fact_columns(features.iloc[explained]),
        lang,
    )


class Explainer:
    """One model's explanations: what the batch, the report and the REST service all run.

    Rows come as the model matrix (for the counterfactuals) and, for the rows that get
    reasons, their :func:`fact_columns` (for the texts), so a caller holding rows as dicts and
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

    def explain_matrix(
        self,
        probabilities: np.ndarray,
        handed_over: np.ndarray,
        rows: np.ndarray,
        matrix: np.ndarray,
        raw: np.ndarray,
        values_of: Callable[[np.ndarray], FactColumns],
        lang: str,
    ) -> ExplanationColumns:
        """Explanations of all rows, the ``rows`` among them reasoned about.

        ``matrix`` and ``raw`` are the model matrix and the booster's raw output of ``rows``
        only (the counterfactuals start from them); medium- and high-risk rows among them get
        reasons, every row its decision. ``values_of`` as in :meth:`explain_columns`.
        """
        probabilities = np.asarray(probabilities, dtype="float64")
        drops = self.risk_drops(matrix, raw, probabilities[rows])
        causes = np.full((len(probabilities), MAX_REASONS), -1, dtype=np.int64)
        top_drops = np.full((len(probabilities), MAX_REASONS), np.nan)
        causes[rows], top_drops[rows] = rank_causes(drops)
        needs_reason = np.zeros(len(probabilities), dtype=bool)
        needs_reason[rows] = self.model.risk_levels(probabilities[rows]) != "low"
        return self.explain_columns(
            probabilities,
            handed_over,
            causes,
            top_drops,
            values_of,
            lang,
            needs_reason=needs_reason,
        )

    def explain_columns(
        self,
        probabilities: np.ndarray,
        handed_over: np.ndarray,
        causes: np.ndarray,
        drops: np.ndarray,
        values_of: Callable[[np.ndarray], FactColumns],
        lang: str,
        *,
        needs_reason: np.ndarray | None = None,
    ) -> ExplanationColumns:
        """Explanations of rows whose causes are ranked (:func:`rank_causes`; -1: no cause).

        A row of ``needs_reason`` (medium or high risk) without a named cause gets
        :data:`NO_SINGLE_CAUSE`, which no fix removes (drop and share 0). ``values_of`` gives
        the :func:`fact_columns` of the rows at the positions it is given: only the rows with
        reasons need them. Every step runs on columns, a cause (and a fact) at a time.
        """
        if lang not in LANGUAGES:
            raise ValueError(f"lang must be one of {LANGUAGES}, not {lang!r}")
        probabilities = np.asarray(probabilities, dtype="float64")
        causes, drops = causes.copy(), drops.copy()
        if needs_reason is not None:
            unexplained = needs_reason & (causes[:, 0] < 0)
            causes[unexplained, 0] = REASON_CODES.index(NO_SINGLE_CAUSE)
            drops[unexplained, 0] = 0.0
        explained = np.flatnonzero(causes[:, 0] >= 0)
        values = values_of(explained)
        fact_row = np.full(len(causes), -1, dtype=np.int64)
        fact_row[explained] = np.arange(len(explained))

        codes = np.full(causes.shape, None, dtype=object)
        facts = np.full(causes.shape, None, dtype=object)
        shares = np.full(causes.shape, np.nan)
        risk_drops = np.full(causes.shape, np.nan)
        for index, code in enumerate(REASON_CODES):
            rows, slots = np.nonzero(causes == index)
            if not len(rows):
                continue
            codes[rows, slots] = code
            facts[rows, slots] = self._facts(code, values, fact_row[rows], lang)
            dropped = drops[rows, slots].tolist()
            risk_drops[rows, slots] = [round(drop, 6) for drop in dropped]
            shares[rows, slots] = [
                round(drop / probability, 4) if probability > 0 else 0.0
                for drop, probability in zip(dropped, probabilities[rows].tolist(), strict=True)
            ]
        decisions, savings = build_decisions(probabilities, handed_over, self.costs)
        return ExplanationColumns(
            codes=codes,
            shares=shares,
            risk_drops=risk_drops,
            facts=facts,
            actions=self._actions(causes, decisions, lang),
            decisions=decisions.tolist(),
            savings=[round(saving, 4) for saving in savings.tolist()],
            fact_values=values,
            fact_row=fact_row,
        )

    def _facts(self, code: str, values: FactColumns, rows: np.ndarray, lang: str) -> list[str]:
        """The facts of reason ``code`` at each of ``rows`` (rows of ``values``), joined."""
        entry = self.playbook.entry(code)
        held = _held_facts(code, values, rows, self.reference)
        if len(held) == 1:
            (name,) = held
            return format_rows(entry.facts[name].get(lang), values, rows.tolist())
        parts: list[list[str]] = [[] for _ in range(len(rows))]
        for name, holds in held.items():
            chosen = np.flatnonzero(holds)
            texts = format_rows(entry.facts[name].get(lang), values, rows[chosen].tolist())
            for k, text in zip(chosen.tolist(), texts, strict=True):
                parts[k].append(text)
        return ["; ".join(texts) for texts in parts]

    def _actions(
        self, causes: np.ndarray, decisions: np.ndarray, lang: str
    ) -> list[tuple[str, ...]]:
        """Each row's actions, worked out once per distinct (reasons, decision)."""
        decision_index = {decision: i for i, decision in enumerate(DECISIONS)}
        keys = np.column_stack(
            [causes, np.fromiter(map(decision_index.get, decisions), np.int64, len(decisions))]
        )
        distinct, inverse = np.unique(keys, axis=0, return_inverse=True)
        chosen = [
            _actions(
                tuple(REASON_CODES[c] for c in key[:-1] if c >= 0),
                DECISIONS[key[-1]],
                lang,
                self.playbook,
            )
            for key in distinct.tolist()
        ]
        return [chosen[k] for k in inverse.reshape(-1).tolist()]


def rank_causes(drops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, up to MAX_REASONS causes with a real drop, largest first: their indexes in
    :data:`CAUSES` (-1 past the last) and their drops (NaN past the last)."""
    clean = np.nan_to_num(drops, nan=-np.inf)
    order = np.argsort(-clean, axis=1, kind="stable")[:, :MAX_REASONS]
    top = np.take_along_axis(clean, order, axis=1)
    named = top >= MIN_RISK_DROP
    return np.where(named, order, -1), np.where(named, top, np.nan)


MAX_ACTIONS = 4


def _actions(
    codes: tuple[str, ...], decision: str, lang: str, playbook: Playbook
) -> tuple[str, ...]:
    """The decision, then each reason's first action, then their second ones; no repeats.

    A seller acts on a few things: at most MAX_ACTIONS, the most important first.
    """
    chosen: dict[str, None] = {}
    if decision != "ship":
        chosen[playbook.decisions[decision].get(lang)] = None
    entries = [playbook.entry(code) for code in codes]
    depth = max((len(entry.actions) for entry in entries), default=0)
    for level in range(depth):
        for entry in entries:
            if level < len(entry.actions):
                chosen.setdefault(entry.actions[level].get(lang), None)
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
