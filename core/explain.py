"""Why an order is at risk, what the seller should do, and whether it pays to act.

Reasons are **counterfactual** (:mod:`core.counterfactuals`): for each seller-facing cause that
applies to an order, its features are set to their "no problem" values (price unchanged, scans
up to date, on time, card untouched, ...) and the model scores the order again. The drop in
calibrated probability is how much fixing that cause would help — the seller's real question —
and ranks the causes. Only the causes that apply to an order are re-scored, and all of a batch's
variants go through the booster in one call, so a reason costs about one extra predict per
applicable cause (TreeSHAP would cost milliseconds per row and answer a less useful question:
see the README's figures).

``share`` is the part of this order's risk that fixing the cause would remove, measured on the
log-odds between the order's probability and its probability with every applying cause fixed
(:func:`log_odds_share`): near certainty, where each cause moves the probability little, it
still says how much a cause matters. Shares of several causes need not add up to one (causes
interact).

The playbook (``playbook.yaml``, editable by the seller; :mod:`core.playbook`) maps each cause to
its title, the facts shown and the actions, in English, Chinese and Russian. This module ranks
the causes into reasons, words them and picks the decision: :class:`Explainer`, which the batch,
the report and the REST service all run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.counterfactuals import no_problem_probabilities, reference_codes, risk_drop_matrix
from core.playbook import (
    DECISIONS,
    LANGUAGES,
    NO_SINGLE_CAUSE,
    REASON_CODES,
    FactColumns,
    Playbook,
    format_rows,
    frame_fact_columns,
    held_facts,
    load_playbook,
)

# The REST service imports the fact values of rows held as dicts from here, with the rest.
from core.playbook import row_fact_columns as row_fact_columns

if TYPE_CHECKING:
    from core.costs import CostsConfig
    from core.model import RiskModel

logger = logging.getLogger(__name__)

MAX_REASONS = 3
# A cause must remove at least this much probability to be named: noise is not a reason.
MIN_RISK_DROP = 0.002


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reason:
    code: str
    share: float  # of the order's risk, on the log-odds (log_odds_share)
    risk_drop: float  # calibrated probability removed if the cause were fixed
    facts: str  # in the requested language
    values: dict[str, float]  # the numbers behind the facts


@dataclass(frozen=True)
class Explanation:
    reasons: tuple[Reason, ...]
    actions: tuple[str, ...]
    decision: str
    expected_saving: float


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


def _quoted_numbers(columns: FactColumns, row: int) -> dict[str, float]:
    """The known numbers among a row's fact values (a reason's ``values``)."""
    return {
        name: value
        for name, column in columns.items()
        if isinstance(value := column[row], float) and value == value
    }


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
        no_problem = np.full(len(probabilities), np.nan)
        no_problem[rows] = no_problem_probabilities(
            self.model, matrix, raw, probabilities[rows], self.reference_codes
        )
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
            no_problem=no_problem,
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
        no_problem: np.ndarray | None = None,
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
        shown = self.playbook.named_values(values, lang)
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
            facts[rows, slots] = self._facts(code, values, shown, fact_row[rows], lang)
            dropped = drops[rows, slots].tolist()
            risk_drops[rows, slots] = [round(drop, 6) for drop in dropped]
            floors = [math.nan] * len(rows) if no_problem is None else no_problem[rows].tolist()
            shares[rows, slots] = [
                round(log_odds_share(probability, drop, floor), 4)
                for drop, probability, floor in zip(
                    dropped, probabilities[rows].tolist(), floors, strict=True
                )
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

    def _facts(
        self, code: str, values: FactColumns, shown: FactColumns, rows: np.ndarray, lang: str
    ) -> list[str]:
        """The facts of reason ``code`` at each of ``rows`` (rows of ``values``), joined:
        which facts hold is read from ``values``, their words from ``shown`` (the same values
        with Ozon's names in the page's language, :meth:`Playbook.named_values`)."""
        entry = self.playbook.entry(code)
        held = held_facts(code, values, rows, self.reference)
        if len(held) == 1:
            (name,) = held
            return format_rows(entry.facts[name].get(lang), shown, rows.tolist())
        parts: list[list[str]] = [[] for _ in range(len(rows))]
        for name, holds in held.items():
            chosen = np.flatnonzero(holds)
            texts = format_rows(entry.facts[name].get(lang), shown, rows[chosen].tolist())
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


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1.0 - 1e-9)
    return math.log(p) - math.log1p(-p)


def log_odds_share(probability: float, drop: float, no_problem: float) -> float:
    """The part of an order's risk that fixing one cause removes, on the log-odds scale.

    Measured between the order's probability and its ``no_problem`` probability (every cause
    that applies fixed, :func:`core.counterfactuals.no_problem_probabilities`): a cause that
    takes an order from 99.9 % to 99 % removes a third of the way to its no-problem 50 %, not
    0.9 % of its risk as ``drop / probability`` would say, since near certainty each further
    cause moves the probability less. Within [0, 1]. When fixing everything would not lower
    the order (or ``no_problem`` is unknown), the plain ``drop / probability``.
    """
    if probability <= 0.0:
        return 0.0
    excess = _logit(probability) - _logit(no_problem) if no_problem == no_problem else math.nan
    if not excess > 1e-9:
        return drop / probability
    removed = _logit(probability) - _logit(probability - drop)
    return min(max(removed / excess, 0.0), 1.0)


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
