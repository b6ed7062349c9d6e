"""The calibrators: monotone, bounded, serialisable, and calibrated where the truth is known."""

from __future__ import annotations

import json
import typing
from typing import TYPE_CHECKING

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from core.calibration import (
    BetaCalibrator,
    CalibrationMethod,
    IsotonicCalibrator,
    SigmoidCalibrator,
    VennAbersCalibrator,
    calibrator_from_dict,
    fit_calibrator,
    venn_abers_at_knots,
)
from core.features import FEATURE_VERSION
from core.model import RiskModel
from training.config import CalibrationConfig, load_training_config
from training.evaluate import expected_calibration_error
from training.fit import fit_risk_model

if TYPE_CHECKING:
    from conftest import SyntheticSet

METHODS = typing.get_args(CalibrationMethod)
MIN_P = 0.001
EXTREMES = np.array([0.0, 1e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-12, 1.0])


def _true_probability(raw: np.ndarray) -> np.ndarray:
    """A monotone distortion of the raw scores (over-confident booster, shifted base rate):
    within the Platt and beta families, so every calibrator can represent it."""
    p = np.clip(raw, 1e-9, 1 - 1e-9)
    return 1.0 / (1.0 + np.exp(-(0.6 * np.log(p / (1 - p)) - 0.4)))


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.beta(0.7, 2.5, size=n)
    truth = _true_probability(raw)
    return raw, (rng.random(n) < truth).astype("int64"), truth


@pytest.fixture(scope="module")
def fitted() -> dict[str, object]:
    raw, labels, _ = _synthetic(20_000, seed=1)
    return {method: fit_calibrator(method, raw, labels, MIN_P) for method in METHODS}


def test_every_method_is_allowed_by_the_training_config() -> None:
    allowed = typing.get_args(CalibrationConfig.model_fields["method"].annotation)
    assert set(allowed) == set(METHODS) == {"isotonic", "sigmoid", "beta", "venn_abers"}
    for method in METHODS:
        config = load_training_config(overrides={"calibration": {"method": method}})
        assert config.calibration.method == method


@pytest.mark.parametrize("method", METHODS)
def test_calibrators_never_decrease(method: str, fitted: dict) -> None:
    grid = np.r_[EXTREMES, np.linspace(0.0, 1.0, 5001)]
    grid.sort()
    p = fitted[method].transform(grid)
    assert np.all(np.diff(p) >= 0)


@pytest.mark.parametrize("method", METHODS)
def test_calibrators_stay_within_the_bounds_at_extreme_scores(method: str, fitted: dict) -> None:
    p = fitted[method].transform(EXTREMES)
    assert np.all(np.isfinite(p))
    assert p.min() >= MIN_P
    assert p.max() <= 1 - MIN_P


@pytest.mark.parametrize("method", METHODS)
def test_calibrators_stay_within_the_bounds_when_the_split_is_all_one_way(method: str) -> None:
    """Scores that separate the classes perfectly push every fit to 0 and 1; the bounds hold."""
    raw = np.r_[np.full(500, 0.01), np.full(500, 0.99)]
    labels = np.r_[np.zeros(500, dtype="int64"), np.ones(500, dtype="int64")]
    p = fit_calibrator(method, raw, labels, MIN_P).transform(EXTREMES)
    assert p.min() >= MIN_P
    assert p.max() <= 1 - MIN_P


@pytest.mark.parametrize("method", METHODS)
def test_calibrators_round_trip_through_json(method: str, fitted: dict) -> None:
    calibrator = fitted[method]
    data = json.loads(json.dumps(calibrator.to_dict()))
    assert data["method"] == method
    restored = calibrator_from_dict(data)
    raw = np.r_[EXTREMES, np.random.default_rng(2).random(1000)]
    assert np.array_equal(restored.transform(raw), calibrator.transform(raw))


@pytest.mark.parametrize("method", ["beta", "venn_abers"])
def test_a_saved_model_reloads_its_new_calibrator(
    method: str, synthetic_set: SyntheticSet, fast_training: dict, tmp_path
) -> None:
    config = load_training_config(overrides={**fast_training, "calibration": {"method": method}})
    model = fit_risk_model(
        synthetic_set.frame,
        config,
        feature_columns=synthetic_set.feature_columns,
        categorical_columns=synthetic_set.categorical_columns,
        feature_version=FEATURE_VERSION,
    )
    loaded = RiskModel.load(model.save(tmp_path / "model"))
    assert loaded.calibrator.method == method
    test = synthetic_set.frame[synthetic_set.frame["split"] == "test"]
    assert np.array_equal(loaded.score_features(test), model.score_features(test))


def test_saved_isotonic_and_sigmoid_dicts_keep_their_format() -> None:
    """Models saved before the new methods existed store exactly these keys."""
    isotonic = {"method": "isotonic", "x_knots": [0.1, 0.9], "y_knots": [0.05, 0.8]}
    sigmoid = {"method": "sigmoid", "slope": 0.8, "intercept": -0.3, "min_probability": 0.001}
    assert isinstance(calibrator_from_dict(isotonic), IsotonicCalibrator)
    assert isinstance(calibrator_from_dict(sigmoid), SigmoidCalibrator)
    assert set(calibrator_from_dict(sigmoid).to_dict()) == set(sigmoid)
    assert set(calibrator_from_dict(isotonic).to_dict()) == {*isotonic, "min_probability"}


@pytest.mark.parametrize("method", METHODS)
def test_calibrators_recover_a_known_distortion(method: str, fitted: dict) -> None:
    raw, _, truth = _synthetic(20_000, seed=3)
    before = expected_calibration_error(truth, raw)
    p = fitted[method].transform(raw)
    # The ECE against the true probabilities: each equal-mass bin's mean true probability
    # stands in for its observed rate.
    after = expected_calibration_error(truth, p)
    assert before > 0.05
    assert after < 0.01
    assert np.mean(np.abs(p - truth)) < 0.02


def test_beta_calibration_contains_platt_scaling() -> None:
    """Labels drawn from a Platt curve give a beta fit with ``a ≈ b`` (the Platt case)."""
    raw, labels, _ = _synthetic(50_000, seed=4)
    beta = BetaCalibrator.fit(raw, labels, MIN_P)
    assert beta.a == pytest.approx(0.6, abs=0.05)
    assert beta.b == pytest.approx(0.6, abs=0.08)
    assert beta.c == pytest.approx(-0.4, abs=0.1)


def test_beta_calibration_drops_a_negative_slope() -> None:
    """A U-shaped relation would need a negative slope; the fit keeps it non-decreasing."""
    rng = np.random.default_rng(5)
    raw = rng.random(5000)
    labels = (rng.random(5000) < 0.2 + 0.6 * (raw < 0.1) + 0.3 * raw).astype("int64")
    beta = BetaCalibrator.fit(raw, labels, MIN_P)
    assert beta.a >= 0 and beta.b >= 0
    grid = np.linspace(0, 1, 1001)
    assert np.all(np.diff(beta.transform(grid)) >= 0)


def _brute_force_venn_abers(raw: np.ndarray, labels: np.ndarray, score: float) -> tuple:
    """``p0, p1`` by definition: the isotonic fit with the test point labelled 0, then 1."""
    values = []
    for label in (0, 1):
        iso = IsotonicRegression().fit(np.r_[raw, score], np.r_[labels, label])
        values.append(float(iso.predict([score])[0]))
    return tuple(values)


@pytest.mark.parametrize("seed", range(5))
def test_venn_abers_knots_are_the_exact_pair(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = np.round(rng.random(200), 2)  # ties, as a booster's leaves give
    labels = (rng.random(200) < raw**2).astype("int64")
    x_knots, p0, p1 = venn_abers_at_knots(raw, labels, max_knots=None)
    assert np.array_equal(x_knots, np.unique(raw))
    for score, low, high in zip(x_knots, p0, p1, strict=True):
        assert (low, high) == pytest.approx(_brute_force_venn_abers(raw, labels, score), abs=1e-12)


def test_venn_abers_uses_at_most_the_requested_knots() -> None:
    raw, labels, _ = _synthetic(20_000, seed=6)
    x_knots, _, _ = venn_abers_at_knots(raw, labels, max_knots=50)
    assert len(x_knots) <= 52
    assert x_knots[0] == raw.min() and x_knots[-1] == raw.max()
    assert np.all(np.diff(x_knots) > 0)


def test_venn_abers_probability_lies_between_p0_and_p1(fitted: dict) -> None:
    calibrator = fitted["venn_abers"]
    assert isinstance(calibrator, VennAbersCalibrator)
    raw = np.r_[EXTREMES, np.random.default_rng(7).random(5000)]
    p0, p1 = calibrator.transform_interval(raw)
    p = calibrator.transform(raw)
    assert np.all(p0 <= p) and np.all(p <= p1)
    assert np.all(p0 < p1)


def test_venn_abers_interval_narrows_with_more_calibration_data() -> None:
    grid = np.linspace(0.05, 0.6, 50)
    widths = []
    for n in (1_000, 30_000):
        raw, labels, _ = _synthetic(n, seed=8)
        p0, p1 = VennAbersCalibrator.fit(raw, labels, MIN_P).transform_interval(grid)
        widths.append(float(np.mean(p1 - p0)))
    assert widths[1] < widths[0] / 5


@pytest.mark.parametrize("method", ["isotonic", "venn_abers"])
def test_step_calibrators_keep_the_ranking(method: str, fitted: dict) -> None:
    """The isotonic steps are tilted, so distinct scores keep distinct probabilities."""
    raw, _, _ = _synthetic(20_000, seed=9)
    inside = np.sort(raw[(raw > 0.01) & (raw < 0.9)])
    p = fitted[method].transform(np.unique(inside))
    assert np.all(np.diff(p) > 0)


def test_venn_abers_claims_no_certainty_from_a_few_postings() -> None:
    """A top block of five postings that all cancelled: isotonic says 1 - min_p, Venn-Abers
    says 6/7 (the rule of succession)."""
    raw = np.r_[np.linspace(0.1, 0.5, 200), np.full(5, 0.9)]
    labels = np.r_[(np.arange(200) % 3 == 0).astype("int64"), np.ones(5, dtype="int64")]
    top = np.array([0.9])
    assert IsotonicCalibrator.fit(raw, labels, MIN_P).transform(top)[0] == 1 - MIN_P
    assert VennAbersCalibrator.fit(raw, labels, MIN_P).transform(top)[0] == pytest.approx(6 / 7)
