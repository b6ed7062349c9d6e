"""Probabilities and explanations from the model matrix, without a feature DataFrame.

``RiskModel.score_features`` and ``core.explain.build_explanations`` take the feature frame
of ``build_features``; for a few rows their fixed pandas cost (building the frame, encoding it,
``to_dict``, a frame of risk drops) is ~3 ms, most of a request. The service already holds each
row as a dict, so this module runs the same steps on arrays:

- :class:`MatrixEncoder` builds the booster's matrix as ``FeatureEncoder.build_matrix`` does
  (numbers as floats, a category as the position of its level, an unseen level as NaN);
- :class:`FastExplainer` hands the matrix and the rows' fact values to
  ``core.explain.Explainer``, the code ``build_explanations`` runs: the counterfactuals, the
  ranking, the facts, the decision and the actions.

Nothing here decides anything on its own. The results equal the frame-based functions
(``tests/test_serving_parity.py``); each model is checked on probe requests when it is loaded
and falls back to the frame-based functions if they ever differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.explain import (
    FACT_NUMBER_COLUMNS,
    FACT_TEXT_COLUMNS,
    Explainer,
    Explanation,
    FactColumns,
    fact_columns,
    rank_causes,
)
from core.model import RiskModel


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
        self.explainer = Explainer(model)

    def explain(
        self,
        matrix: np.ndarray,
        raw: np.ndarray,
        probabilities: np.ndarray,
        rows: Sequence[Mapping[str, Any]],
        lang: str,
    ) -> list[Explanation]:
        handed_over = np.array([_number(row["is_handed_over"]) for row in rows], dtype="float64")
        handed_over = np.nan_to_num(handed_over, nan=0.0)
        drops = self.explainer.risk_drops(matrix, raw, probabilities)

        def values_of(positions: np.ndarray) -> FactColumns:
            chosen = [rows[i] for i in positions.tolist()]
            numbers = {
                column: np.array([_number(row[column]) for row in chosen], dtype="float64")
                for column in FACT_NUMBER_COLUMNS
            }
            texts = {column: [row[column] for row in chosen] for column in FACT_TEXT_COLUMNS}
            return fact_columns(numbers, texts)

        return self.explainer.explain_columns(
            probabilities,
            handed_over,
            *rank_causes(drops),
            values_of,
            lang,
            needs_reason=self.explainer.model.risk_levels(probabilities) != "low",
        ).to_explanations()


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)
