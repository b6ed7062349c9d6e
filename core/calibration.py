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
    """The isotonic fit, made strictly increasing so that it keeps the booster's ranking.

    Plain isotonic regression is a staircase: every posting in one of its flat blocks gets the
    same probability, so postings the booster ranked apart become ties and the ranking (ROC AUC)
    loses what the booster knew. Here each block rises by a tiny fraction (:data:`_BLOCK_RISE`)
    of the steps to its neighbours, from its lowest raw score to its highest: the order within
    a block is the booster's, and the probabilities stay the isotonic fit's to within that
    fraction. Stored as knots, applied by linear interpolation and clipped to the knots' range.
    """

    x_knots: np.ndarray
    y_knots: np.ndarray
    min_probability: float = 0.0
    method: str = "isotonic"

    @classmethod
    def fit(
        cls, raw: np.ndarray, labels: np.ndarray, min_probability: float = 0.0
    ) -> IsotonicCalibrator:
        raw = np.asarray(raw, dtype="float64")
        iso = IsotonicRegression(
            y_min=min_probability, y_max=1.0 - min_probability, out_of_bounds="clip"
        )
        fitted = iso.fit_transform(raw, np.asarray(labels, dtype="float64"))
        x_knots, y_knots = _rising_blocks(raw, fitted)
        return cls(x_knots=x_knots, y_knots=y_knots, min_probability=min_probability)

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


# How far each isotonic block rises within itself, as a fraction of the step to its neighbours.
_BLOCK_RISE = 1e-3


def _rising_blocks(raw: np.ndarray, fitted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots of the isotonic fit with each flat block tilted upwards by a tiny amount.

    A block of raw scores ``[lo, hi]`` at value ``y`` becomes the segment from
    ``(lo, y - r * (y - y_before))`` to ``(hi, y + r * (y_after - y))``: strictly increasing,
    never past its neighbours, and the first and last blocks keep their outer values (so the
    probabilities stay within the fit's bounds). A block of one raw score is one knot.
    """
    order = np.argsort(raw, kind="stable")
    x, y = raw[order], fitted[order]
    starts = np.flatnonzero(np.r_[True, y[1:] != y[:-1]])
    ends = np.r_[starts[1:], len(x)] - 1
    value = y[starts]
    step_before = np.diff(value, prepend=value[0])
    step_after = np.diff(value, append=value[-1])
    lo_y, hi_y = value - _BLOCK_RISE * step_before, value + _BLOCK_RISE * step_after
    x_lo, x_hi = x[starts], x[ends]
    single = x_lo == x_hi
    x_knots = np.column_stack([x_lo, x_hi]).ravel()
    y_knots = np.column_stack([np.where(single, value, lo_y), np.where(single, value, hi_y)])
    keep = np.column_stack([np.ones(len(value), dtype=bool), ~single]).ravel()
    return x_knots[keep], y_knots.ravel()[keep]


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
