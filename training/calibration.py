"""Probability calibrators fitted on the calibration split, stored as plain arrays.

The booster's raw probabilities rank well but are not probabilities the seller can act on:
the cost thresholds of the risk levels assume that 0.2 means one in five. A calibrator maps raw
scores to calibrated ones; it is fitted on the calibration split, which is later in time than
the training split, so it also absorbs some of the drift between training and scoring.

Both calibrators are applied with numpy only (no scikit-learn object at scoring time) and
serialise to a small JSON-ready dict, so a saved model needs no pickle.

Calibrated probabilities are kept within ``[min_probability, 1 - min_probability]``: an isotonic
bin without a single cancellation in the calibration split does not prove the risk is zero, and
an exact 0 or 1 would make the log loss of one surprise infinite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

CalibrationMethod = Literal["isotonic", "sigmoid"]

# Raw probabilities are clipped away from 0 and 1 before the logit of the sigmoid calibrator.
_LOGIT_EPS = 1e-6


class Calibrator(Protocol):
    """Maps raw model probabilities to calibrated probabilities."""

    method: str

    def transform(self, raw: np.ndarray) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class IsotonicCalibrator:
    """Monotone step-wise linear map, stored as the isotonic fit's knots.

    Applied by linear interpolation between the knots and clipped to the knots' range, which is
    exactly what ``IsotonicRegression(out_of_bounds="clip").predict`` computes.
    """

    x_knots: np.ndarray
    y_knots: np.ndarray
    min_probability: float = 0.0
    method: str = "isotonic"

    @classmethod
    def fit(
        cls, raw: np.ndarray, labels: np.ndarray, min_probability: float = 0.0
    ) -> IsotonicCalibrator:
        iso = IsotonicRegression(
            y_min=min_probability, y_max=1.0 - min_probability, out_of_bounds="clip"
        )
        iso.fit(np.asarray(raw, dtype="float64"), np.asarray(labels, dtype="float64"))
        return cls(
            x_knots=np.asarray(iso.X_thresholds_, dtype="float64"),
            y_knots=np.asarray(iso.y_thresholds_, dtype="float64"),
            min_probability=min_probability,
        )

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(raw, dtype="float64"), self.x_knots, self.y_knots)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "x_knots": self.x_knots.tolist(),
            "y_knots": self.y_knots.tolist(),
            "min_probability": self.min_probability,
        }


@dataclass(frozen=True)
class SigmoidCalibrator:
    """Platt scaling on the logit of the raw probability: ``p = 1 / (1 + exp(-(a·logit + b)))``."""

    slope: float
    intercept: float
    min_probability: float = 0.0
    method: str = "sigmoid"

    @classmethod
    def fit(
        cls, raw: np.ndarray, labels: np.ndarray, min_probability: float = 0.0
    ) -> SigmoidCalibrator:
        # A practically unregularised fit: the two parameters are all the calibrator has.
        logistic = LogisticRegression(C=1e6, max_iter=1000)
        logistic.fit(_logit(raw).reshape(-1, 1), np.asarray(labels, dtype="int64"))
        return cls(
            slope=float(logistic.coef_[0, 0]),
            intercept=float(logistic.intercept_[0]),
            min_probability=min_probability,
        )

    def transform(self, raw: np.ndarray) -> np.ndarray:
        z = self.slope * _logit(raw) + self.intercept
        p = 1.0 / (1.0 + np.exp(-z))
        return np.clip(p, self.min_probability, 1.0 - self.min_probability)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "slope": self.slope,
            "intercept": self.intercept,
            "min_probability": self.min_probability,
        }


def _logit(raw: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(raw, dtype="float64"), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.log(p / (1.0 - p))


def fit_calibrator(
    method: CalibrationMethod,
    raw: np.ndarray,
    labels: np.ndarray,
    min_probability: float = 0.0,
) -> Calibrator:
    """Fit the calibrator named by ``method`` on raw probabilities and 0/1 labels.

    Raises ``ValueError`` when the labels hold a single class: no calibration can be learned.
    """
    labels = np.asarray(labels)
    if len(labels) == 0 or np.unique(labels).size < 2:
        raise ValueError("the calibration split needs both buyer cancellations and deliveries")
    if method == "isotonic":
        return IsotonicCalibrator.fit(raw, labels, min_probability)
    if method == "sigmoid":
        return SigmoidCalibrator.fit(raw, labels, min_probability)
    raise ValueError(f"unknown calibration method {method!r}")


def calibrator_from_dict(data: dict[str, Any]) -> Calibrator:
    """Rebuild a calibrator from :meth:`to_dict` output."""
    method = data.get("method")
    if method == "isotonic":
        return IsotonicCalibrator(
            x_knots=np.asarray(data["x_knots"], dtype="float64"),
            y_knots=np.asarray(data["y_knots"], dtype="float64"),
            min_probability=float(data.get("min_probability", 0.0)),
        )
    if method == "sigmoid":
        return SigmoidCalibrator(
            slope=float(data["slope"]),
            intercept=float(data["intercept"]),
            min_probability=float(data.get("min_probability", 0.0)),
        )
    raise ValueError(f"unknown calibration method {method!r}")
