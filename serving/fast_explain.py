"""Probabilities and explanations from the model matrix, without a feature DataFrame.

``RiskModel.score_features`` and ``training.explain.build_explanations`` take the feature frame
of ``build_features``; for a few rows their fixed pandas cost (building the frame, encoding it,
``to_dict``, a frame of risk drops) is ~3 ms, most of a request. The service already holds each
row as a dict, so this module runs the same steps on arrays:

- :class:`MatrixEncoder` builds the booster's matrix as ``FeatureEncoder.build_matrix`` does
  (numbers as floats, a category as the position of its level, an unseen level as NaN);
- :class:`FastExplainer` runs ``build_explanations``' own parts in its order: the cause rules
  (``CAUSE_RULES``), the log-odds shift, the ranking, the fact templates of the playbook
  (``describe_reason``), the decision (``build_decisions``) and the actions.

Nothing here decides anything on its own. The results equal the frame-based functions
(``tests/test_serving_parity.py``); each model is checked on probe requests when it is loaded
and falls back to the frame-based functions if they ever differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import training.explain as explain
from training.explain import (
    CAUSE_RULES,
    CAUSES,
    Explanation,
    Reason,
    build_decisions,
    describe_reason,
    load_playbook,
    model_costs,
    reference_codes,
)
from training.model import RiskModel

# The private helpers of build_explanations this module calls, so both run the same code.
_HELPERS = ("_Matrix", "_shift_log_odds", "_rank_causes", "_actions")


class MatrixEncoder:
    """The booster's matrix from feature rows held as dicts (``FeatureEncoder.build_matrix``)."""

    def __init__(self, model: RiskModel) -> None:
        self.columns = tuple(model.feature_columns)
        self._levels = {
            column: {level: float(i) for i, level in enumerate(levels)}
            for column, levels in model.category_levels.items()
        }

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        matrix = np.empty((len(rows), len(self.columns)), dtype="float64")
        for j, column in enumerate(self.columns):
            levels = self._levels.get(column)
            if levels is None:
                matrix[:, j] = [math.nan if row[column] is None else row[column] for row in rows]
            else:
                matrix[:, j] = [levels.get(row[column], math.nan) for row in rows]
        return matrix


class FastExplainer:
    """``build_explanations`` for rows given as the model matrix and the rows' dicts."""

    def __init__(self, model: RiskModel) -> None:
        missing = [name for name in _HELPERS if not hasattr(explain, name)]
        if missing:
            raise ValueError(f"training.explain no longer has {missing}")
        self.model = model
        self.playbook = load_playbook()
        self.costs = model_costs(model)
        self.positions = {column: i for i, column in enumerate(model.feature_columns)}
        self.reference_codes = reference_codes(model)
        self.reference = {
            k: str(v)
            for k, v in (model.metadata.get("reference_values") or {}).items()
            if v is not None
        }

    def risk_drops(
        self, matrix: np.ndarray, raw: np.ndarray, probabilities: np.ndarray
    ) -> np.ndarray:
        """``build_risk_drops`` as an array (rows x ``CAUSES``; NaN: the cause does not apply)."""
        base = explain._Matrix(matrix, self.positions)
        blocks, owners = [], []
        for cause in CAUSE_RULES:
            rows = np.flatnonzero(cause.applies(base, self.reference_codes))
            if rows.size == 0:
                continue
            variant = explain._Matrix(matrix[rows].copy(), self.positions)
            cause.fix(variant, self.reference_codes)
            blocks.append(variant.values)
            owners.append((CAUSES.index(cause.code), rows))
        drops = np.full((len(matrix), len(CAUSES)), np.nan)
        if not blocks:
            return drops
        fixed_raw = self.model.predict_matrix_raw(np.vstack(blocks))
        start = 0
        for column, rows in owners:
            fixed = explain._shift_log_odds(
                probabilities[rows], raw[rows], fixed_raw[start : start + rows.size]
            )
            drops[rows, column] = probabilities[rows] - fixed
            start += rows.size
        return drops

    def explain(
        self,
        matrix: np.ndarray,
        raw: np.ndarray,
        probabilities: np.ndarray,
        rows: Sequence[Mapping[str, Any]],
        lang: str,
    ) -> list[Explanation]:
        handed_over = np.array(
            [
                0.0
                if row["is_handed_over"] is None or math.isnan(row["is_handed_over"])
                else row["is_handed_over"]
                for row in rows
            ],
            dtype="float64",
        )
        decisions, savings = build_decisions(probabilities, handed_over, self.costs)
        drops = self.risk_drops(matrix, raw, probabilities)
        ranked = explain._rank_causes(drops, probabilities)
        explanations = []
        for i, (row, causes) in enumerate(zip(rows, ranked, strict=True)):
            reasons = []
            for cause_index, drop in causes:
                code = CAUSES[cause_index]
                facts, numbers = describe_reason(code, row, lang, self.playbook, self.reference)
                share = drop / probabilities[i] if probabilities[i] > 0 else 0.0
                reasons.append(
                    Reason(code, round(float(share), 4), round(float(drop), 6), facts, numbers)
                )
            decision = str(decisions[i])
            explanations.append(
                Explanation(
                    reasons=tuple(reasons),
                    actions=explain._actions(tuple(reasons), decision, lang, self.playbook),
                    decision=decision,
                    expected_saving=round(float(savings[i]), 4),
                )
            )
        return explanations
