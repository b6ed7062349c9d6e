"""Fitting the risk model: the booster on ``train``, early stopping on ``valid``, the
calibrator on ``calibration``; the result is a :class:`~core.model.RiskModel`.

Only training fits; everything that scores loads a fitted model (``core.model``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from core.calibration import Calibrator, fit_calibrator
from core.model import (
    FeatureEncoder,
    RiskModel,
    build_category_levels,
    build_risk_thresholds,
)

if TYPE_CHECKING:
    from core.aggregates import HistoryAggregates
    from training.config import TrainingConfig

logger = logging.getLogger(__name__)


class TrainingDataError(Exception):
    """The training set cannot train a model (an empty split, a single class)."""


def fit_configured_calibrator(
    raw: np.ndarray, labels: np.ndarray, config: TrainingConfig
) -> Calibrator:
    """The configured calibrator fitted on ``raw`` scores; a set it cannot fit on is a
    :class:`TrainingDataError` naming why."""
    try:
        return fit_calibrator(
            config.calibration.method, raw, labels, config.calibration.min_probability
        )
    except ValueError as exc:
        raise TrainingDataError(str(exc)) from None


def fit_risk_model(
    training_set: pd.DataFrame,
    config: TrainingConfig,
    *,
    feature_columns: Sequence[str],
    categorical_columns: Sequence[str],
    feature_version: str,
    aggregates: HistoryAggregates | None = None,
    metadata: dict[str, Any] | None = None,
) -> RiskModel:
    """Train the booster on ``train``, stop early on ``valid``, calibrate on ``calibration``.

    ``training_set`` has a ``split`` column (train/valid/calibration/test), a 0/1 ``label`` and
    the feature columns. The category levels are those seen in the train split; the thresholds
    come from ``config.costs``. The test split is not read.
    """
    feature_columns = list(feature_columns)
    categorical = [c for c in feature_columns if c in set(categorical_columns)]
    splits = {name: _split(training_set, name) for name in ("train", "valid", "calibration")}
    category_levels = {name: build_category_levels(splits["train"][name]) for name in categorical}
    encoder = FeatureEncoder(feature_columns, category_levels)
    train_set = lgb.Dataset(
        encoder.build_matrix(splits["train"]),
        label=splits["train"]["label"].to_numpy(dtype="float64"),
        feature_name=feature_columns,
        categorical_feature=categorical,
        free_raw_data=True,
    )
    valid_set = lgb.Dataset(
        encoder.build_matrix(splits["valid"]),
        label=splits["valid"]["label"].to_numpy(dtype="float64"),
        reference=train_set,
    )
    lgb_config = config.lightgbm
    booster = lgb.train(
        lgb_config.booster_params(),
        train_set,
        num_boost_round=lgb_config.num_boost_round,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[lgb.early_stopping(lgb_config.early_stopping_rounds, verbose=False)],
    )
    best_iteration = booster.best_iteration or booster.current_iteration()
    # Re-read the trimmed text so a model in memory and the same model loaded score identically.
    booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best_iteration))
    logger.info("booster: %d trees (best iteration on valid)", best_iteration)

    calibration = splits["calibration"]
    raw = booster.predict(encoder.build_matrix(calibration))
    calibrator = fit_configured_calibrator(raw, calibration["label"].to_numpy(), config)
    meta = {
        "best_iteration": int(best_iteration),
        # The thresholds' inputs: explanations price their decisions with the same costs.
        "costs": config.costs.model_dump(),
        **(metadata or {}),
    }
    return RiskModel(
        booster=booster,
        calibrator=calibrator,
        thresholds=build_risk_thresholds(config.costs),
        feature_version=feature_version,
        feature_columns=tuple(feature_columns),
        category_levels=category_levels,
        aggregates=aggregates,
        metadata=meta,
    )


def _split(training_set: pd.DataFrame, name: str) -> pd.DataFrame:
    part = training_set[training_set["split"] == name]
    if len(part) == 0:
        raise TrainingDataError(f"the {name!r} split of the training set is empty")
    if part["label"].nunique() < 2:
        raise TrainingDataError(
            f"the {name!r} split has a single class ({len(part)} rows): "
            "it needs both buyer cancellations and deliveries"
        )
    return part
