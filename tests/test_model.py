"""The risk model: calibration, cost thresholds, unseen categories, the saved contract."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.calibration import (
    IsotonicCalibrator,
    SigmoidCalibrator,
    calibrator_from_dict,
    fit_calibrator,
)
from core.costs import CostsConfig
from core.features import FEATURE_VERSION
from core.model import (
    IncompatibleModelError,
    RiskModel,
    RiskThresholds,
    assign_risk_levels,
    build_risk_thresholds,
)
from training.config import load_training_config
from training.evaluate import expected_calibration_error
from training.fit import TrainingDataError, fit_risk_model

if TYPE_CHECKING:
    from conftest import SyntheticSet


def _fit(synthetic: SyntheticSet, overrides: dict, frame: pd.DataFrame | None = None) -> RiskModel:
    config = load_training_config(overrides=overrides)
    return fit_risk_model(
        synthetic.frame if frame is None else frame,
        config,
        feature_columns=synthetic.feature_columns,
        categorical_columns=synthetic.categorical_columns,
        feature_version=FEATURE_VERSION,
    )


@pytest.fixture(scope="module")
def model(synthetic_set: SyntheticSet, fast_training: dict) -> RiskModel:
    return _fit(synthetic_set, fast_training)


def _test_rows(synthetic: SyntheticSet) -> pd.DataFrame:
    return synthetic.frame[synthetic.frame["split"] == "test"]


# --- calibration ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["isotonic", "sigmoid"])
def test_calibrators_repair_distorted_probabilities(method: str) -> None:
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.01, 0.6, 20_000)
    labels = (rng.random(truth.size) < truth).astype(int)
    raw = np.sqrt(truth)  # ranks right, overstates every risk
    fit_half, test_half = slice(0, 10_000), slice(10_000, None)
    calibrator = fit_calibrator(method, raw[fit_half], labels[fit_half])
    before = expected_calibration_error(labels[test_half], raw[test_half])
    after = expected_calibration_error(labels[test_half], calibrator.transform(raw[test_half]))
    assert before > 0.15
    assert after < 0.03


def test_isotonic_calibration_keeps_the_boosters_ranking() -> None:
    """Plain isotonic regression maps whole blocks of scores to one value; ours stays strictly
    increasing, so the ranking (ROC AUC) is the booster's, and stays within the fit's range."""
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.01, 0.6, 5_000)
    labels = (rng.random(truth.size) < truth).astype(int)
    raw = np.sqrt(truth)
    calibrator = IsotonicCalibrator.fit(raw, labels, min_probability=0.001)
    ranked = calibrator.transform(np.sort(raw))
    assert np.all(np.diff(ranked) > 0)
    assert ranked.min() >= 0.001 and ranked.max() <= 0.999
    assert len(np.unique(ranked)) == len(np.unique(raw))


def test_calibration_split_corrects_a_shift_in_the_base_rate(
    synthetic_set: SyntheticSet, fast_training: dict
) -> None:
    # Cancellations become rarer after the training period: the booster overstates the risk
    # and the calibrator, fitted on the later calibration split, must bring it back.
    frame = synthetic_set.frame.copy()
    later = frame["split"].isin(["calibration", "test"]).to_numpy()
    rng = np.random.default_rng(7)
    frame.loc[later & (rng.random(len(frame)) < 0.6), "label"] = 0
    model = _fit(synthetic_set, fast_training, frame)
    test = frame[frame["split"] == "test"]
    labels = test["label"].to_numpy()
    raw_ece = expected_calibration_error(labels, model.score_raw(test))
    calibrated_ece = expected_calibration_error(labels, model.score_features(test))
    assert calibrated_ece < raw_ece
    assert calibrated_ece < 0.05


def test_calibrated_model_keeps_ece_low_without_shift(
    model: RiskModel, synthetic_set: SyntheticSet
) -> None:
    test = _test_rows(synthetic_set)
    labels = test["label"].to_numpy()
    raw_ece = expected_calibration_error(labels, model.score_raw(test))
    calibrated_ece = expected_calibration_error(labels, model.score_features(test))
    assert calibrated_ece <= max(raw_ece, 0.0) + 0.02
    assert calibrated_ece < 0.06


def test_calibrated_probabilities_stay_off_zero_and_one() -> None:
    raw = np.array([0.01, 0.02, 0.03, 0.9, 0.95, 0.99])
    labels = np.array([0, 0, 0, 1, 1, 1])
    for method in ("isotonic", "sigmoid"):
        calibrator = fit_calibrator(method, raw, labels, min_probability=0.001)
        p = calibrator.transform(np.array([0.0, 0.005, 0.999, 1.0]))
        assert p.min() >= 0.001
        assert p.max() <= 0.999


def test_calibrator_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        fit_calibrator("isotonic", np.array([0.1, 0.2]), np.array([0, 0]))


@pytest.mark.parametrize(
    "calibrator",
    [
        IsotonicCalibrator(np.array([0.1, 0.5, 0.9]), np.array([0.05, 0.3, 0.8]), 0.001),
        SigmoidCalibrator(slope=0.8, intercept=-0.3, min_probability=0.001),
    ],
)
def test_calibrator_round_trips_through_json(calibrator) -> None:
    restored = calibrator_from_dict(json.loads(json.dumps(calibrator.to_dict())))
    raw = np.linspace(0, 1, 11)
    assert np.array_equal(restored.transform(raw), calibrator.transform(raw))


# --- risk thresholds -----------------------------------------------------------------------


def test_thresholds_follow_the_cost_formula() -> None:
    costs = CostsConfig(
        cancelled_order_cost=400,
        contact_cost=10,
        contact_effect=0.25,
        hold_cost=40,
        hold_effect=0.5,
    )
    thresholds = build_risk_thresholds(costs)
    assert thresholds.medium == pytest.approx(10 / (0.25 * 400))  # 0.1
    # Hold pays off above 40 / (0.5 * 400) = 0.2 but beats contact only above 30 / 100 = 0.3.
    assert thresholds.high == pytest.approx((40 - 10) / ((0.5 - 0.25) * 400))


def test_levels_use_the_thresholds_inclusively() -> None:
    levels = assign_risk_levels(
        np.array([0.0, 0.0999, 0.1, 0.2999, 0.3, 1.0, np.nan]), RiskThresholds(0.1, 0.3)
    )
    assert levels.tolist() == ["low", "low", "medium", "medium", "high", "high", "low"]


@settings(max_examples=200, deadline=None)
@given(
    cancel_cost=st.floats(10, 10_000),
    contact_cost=st.floats(0, 100),
    contact_effect=st.floats(0.01, 0.9),
    extra_cost=st.floats(0, 300),
    extra_effect=st.floats(0.01, 0.9),
    p=st.floats(0, 1),
)
def test_the_level_names_the_action_with_the_best_expected_saving(
    cancel_cost: float,
    contact_cost: float,
    contact_effect: float,
    extra_cost: float,
    extra_effect: float,
    p: float,
) -> None:
    hold_effect = min(1.0, contact_effect + extra_effect)
    if hold_effect <= contact_effect:
        return
    costs = CostsConfig(
        cancelled_order_cost=cancel_cost,
        contact_cost=contact_cost,
        contact_effect=contact_effect,
        hold_cost=contact_cost + extra_cost,
        hold_effect=hold_effect,
    )
    savings = {
        "low": 0.0,
        "medium": p * contact_effect * cancel_cost - contact_cost,
        "high": p * hold_effect * cancel_cost - costs.hold_cost,
    }
    level = assign_risk_levels(np.array([p]), build_risk_thresholds(costs))[0]
    best = max(savings.values())
    # Ties at a threshold may go either way; otherwise the level is the best action.
    assert savings[level] == pytest.approx(best, rel=1e-9, abs=1e-9)


# --- categories ----------------------------------------------------------------------------


def test_category_levels_come_from_the_train_split(model: RiskModel) -> None:
    assert model.category_levels["carrier"] == ("11", "22", "33", "44")
    assert model.category_levels["region"] == ("east", "north", "south")


def test_unseen_and_missing_categories_score_like_missing(
    model: RiskModel, synthetic_set: SyntheticSet
) -> None:
    rows = _test_rows(synthetic_set).head(50).copy()
    unseen = rows.assign(carrier="99", region="atlantis")
    missing = rows.assign(
        carrier=pd.array([None] * len(rows), dtype="string"),
        region=pd.array([None] * len(rows), dtype="string"),
    )
    p_unseen = model.score_features(unseen)
    assert np.isfinite(p_unseen).all()
    assert np.array_equal(p_unseen, model.score_features(missing))
    assert not np.array_equal(p_unseen, model.score_features(rows))


def test_scoring_ignores_column_order_and_extra_columns(
    model: RiskModel, synthetic_set: SyntheticSet
) -> None:
    rows = _test_rows(synthetic_set).head(20)
    shuffled = rows[list(reversed(rows.columns))].assign(unrelated=1.0)
    assert np.array_equal(model.score_features(rows), model.score_features(shuffled))


def test_a_single_posting_scores_like_the_same_posting_in_a_batch(
    model: RiskModel, synthetic_set: SyntheticSet
) -> None:
    # A single row takes the small-frame encoding, a large batch the column-wise one.
    rows = synthetic_set.frame.head(1000).copy()
    rows.loc[rows.index[:5], "carrier"] = pd.NA
    rows.loc[rows.index[5:10], "region"] = "atlantis"
    rows.loc[rows.index[10:15], "price_change_pct"] = np.nan
    batch = model.score_features(rows)
    single = np.array([model.score_features(rows.iloc[[i]])[0] for i in range(0, 1000, 7)])
    assert np.array_equal(single, batch[::7])


def test_nullable_numeric_columns_are_accepted(
    model: RiskModel, synthetic_set: SyntheticSet
) -> None:
    rows = synthetic_set.frame.head(3).copy()
    nullable = rows.assign(is_premium=pd.array([1, None, 0], dtype="Int64"))
    expected = model.score_features(rows.assign(is_premium=[1.0, np.nan, 0.0]))
    assert np.array_equal(model.score_features(nullable), expected)


def test_missing_feature_column_is_a_clear_error(
    model: RiskModel, synthetic_set: SyntheticSet
) -> None:
    with pytest.raises(KeyError, match="hours_since_last_scan"):
        model.score_features(_test_rows(synthetic_set).drop(columns="hours_since_last_scan"))


# --- the saved contract --------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_probabilities(
    model: RiskModel, synthetic_set: SyntheticSet, tmp_path
) -> None:
    path = model.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == [
        "booster.txt",
        "calibrator.json",
        "model.json",
    ]
    loaded = RiskModel.load(path)
    test = _test_rows(synthetic_set)
    assert np.array_equal(loaded.score_features(test), model.score_features(test))
    assert loaded.thresholds == model.thresholds
    assert loaded.feature_columns == model.feature_columns
    assert loaded.category_levels == model.category_levels
    assert loaded.metadata["best_iteration"] == model.metadata["best_iteration"]


def test_load_refuses_another_feature_version(model: RiskModel, tmp_path) -> None:
    path = model.save(tmp_path / "model")
    meta = json.loads((path / "model.json").read_text())
    meta["feature_version"] = f"{FEATURE_VERSION}-old"
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModelError, match="feature version") as error:
        RiskModel.load(path)
    assert f"{FEATURE_VERSION}-old" in str(error.value)


def test_save_refuses_a_non_empty_directory(model: RiskModel, tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "other.txt").write_text("x")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "model")


def test_load_of_a_directory_without_a_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(IncompatibleModelError, match="not a saved risk model"):
        RiskModel.load(tmp_path)


# --- training data -------------------------------------------------------------------------


def test_the_model_carries_the_costs_behind_its_thresholds(model: RiskModel) -> None:
    costs = CostsConfig(**model.metadata["costs"])
    assert costs == CostsConfig()
    assert build_risk_thresholds(costs) == model.thresholds


def test_early_stopping_trims_the_booster(model: RiskModel, fast_training: dict) -> None:
    assert model.booster.num_trees() == model.metadata["best_iteration"]
    assert model.metadata["best_iteration"] < fast_training["lightgbm"]["num_boost_round"]


def test_an_empty_split_is_a_training_data_error(
    synthetic_set: SyntheticSet, fast_training: dict
) -> None:
    frame = synthetic_set.frame[synthetic_set.frame["split"] != "valid"]
    with pytest.raises(TrainingDataError, match="'valid' split"):
        _fit(synthetic_set, fast_training, frame)


def test_a_single_class_calibration_split_is_a_training_data_error(
    synthetic_set: SyntheticSet, fast_training: dict
) -> None:
    frame = synthetic_set.frame.copy()
    frame.loc[frame["split"] == "calibration", "label"] = 0
    with pytest.raises(TrainingDataError, match="calibration"):
        _fit(synthetic_set, fast_training, frame)
