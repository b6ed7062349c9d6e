"""Probability calibrators fitted on the calibration split, stored as plain arrays.

The booster's raw probabilities rank well but are not probabilities the seller can act on:
the cost thresholds of the risk levels assume that 0.2 means one in five. A calibrator maps raw
scores to calibrated ones; it is fitted on the calibration split, which is later in time than
the training split, so it also absorbs some of the drift between training and scoring.

Four methods (``calibration.method`` in the training configuration):

- ``isotonic``: the isotonic fit, tilted so that it keeps the booster's ranking;
- ``sigmoid``: Platt scaling, two parameters on the logit of the raw score;
- ``beta``: beta calibration (Kull et al., 2017), three parameters;
- ``venn_abers``: inductive Venn-Abers, two isotonic fits with the scored posting added to the
  calibration split once as a delivery and once as a cancellation.

All of them are applied with numpy only (no scikit-learn object at scoring time) and serialise
to a small JSON-ready dict, so a saved model needs no pickle.

Calibrated probabilities are kept within ``[min_probability, 1 - min_probability]``: an isotonic
bin without a single cancellation in the calibration split does not prove the risk is zero, and
an exact 0 or 1 would make the log loss of one surprise infinite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from sklearn.isotonic import IsotonicRegression, isotonic_regression
from sklearn.linear_model import LogisticRegression

CalibrationMethod = Literal["isotonic", "sigmoid", "beta", "venn_abers"]

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


@dataclass(frozen=True)
class BetaCalibrator:
    """Beta calibration (Kull, Silva Filho and Flach, 2017): a logistic regression on
    ``ln p`` and ``-ln(1 - p)``, ``p' = 1 / (1 + exp(-(a·ln p - b·ln(1 - p) + c)))``.

    Its family holds the identity and Platt scaling (``a = b``) and, unlike Platt scaling,
    curves that bend differently near 0 and near 1, as a booster's scores often do. Both
    slopes are kept non-negative, so the map never decreases: when the joint fit gives one a
    negative sign, that feature is dropped and the other refitted alone (as the authors'
    ``betacal`` package does); a slope still negative then leaves only the intercept, the base
    rate.
    """

    a: float
    b: float
    c: float
    min_probability: float = 0.0
    method: str = "beta"

    @classmethod
    def fit(
        cls, raw: np.ndarray, labels: np.ndarray, min_probability: float = 0.0
    ) -> BetaCalibrator:
        features = _beta_features(raw)
        y = np.asarray(labels, dtype="int64")
        coef, intercept = _unregularised_logistic(features, y)
        if coef[0] < 0 or coef[1] < 0:
            keep = 1 if coef[0] < 0 else 0
            single, intercept = _unregularised_logistic(features[:, [keep]], y)
            coef = np.zeros(2)
            if single[0] > 0:
                coef[keep] = single[0]
            else:
                rate = float(np.clip(y.mean(), _LOGIT_EPS, 1.0 - _LOGIT_EPS))
                intercept = float(np.log(rate / (1.0 - rate)))
        return cls(
            a=float(coef[0]), b=float(coef[1]), c=float(intercept), min_probability=min_probability
        )

    def transform(self, raw: np.ndarray) -> np.ndarray:
        features = _beta_features(raw)
        p = _sigmoid(self.a * features[:, 0] + self.b * features[:, 1] + self.c)
        return np.clip(p, self.min_probability, 1.0 - self.min_probability)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "a": self.a,
            "b": self.b,
            "c": self.c,
            "min_probability": self.min_probability,
        }


# Venn-Abers knots: at most this many raw scores of the calibration split (equal-mass).
VENN_ABERS_KNOTS = 1000


@dataclass(frozen=True)
class VennAbersCalibrator:
    """Inductive Venn-Abers (Vovk, Petej and Fedorova, 2015), precomputed at knots.

    For a raw score ``s``, ``p0`` is the isotonic fit at ``s`` of the calibration split with
    ``(s, 0)`` added and ``p1`` the same with ``(s, 1)``. When the calibration postings and the
    scored one are exchangeable, one of the two is calibrated, and the pair narrows as the
    calibration split grows. (Moments of one posting, and weeks with their own base rate, are
    not exchangeable: on a shop's history the gap understates the uncertainty.) They are merged
    into one probability as ``p = p1 / (1 - p0 + p1)``, the merge with the smallest worst-case
    log-loss regret against the pair (Vovk and Petej, 2014); it always lies within ``[p0, p1]``.
    Where plain isotonic regression claims certainty from a few postings, this does not: at a
    top block of ``k`` postings that all cancelled, ``p0 = k / (k + 1)``, ``p1 = 1`` and
    ``p = (k + 1) / (k + 2)``.

    The approximation: the two fits are not run for every scored posting. ``fit`` computes
    ``p0`` and ``p1`` exactly at up to :data:`VENN_ABERS_KNOTS` raw scores of the calibration
    split (equal-mass quantiles, the lowest and highest included; every distinct score when
    there are fewer), with the scored posting tied with the calibration postings of that score.
    Between knots the pair and the merged probability are interpolated linearly, and beyond
    them they are held at the end knots. The exact ``p0`` and ``p1`` are step functions of the
    raw score, so the interpolation is where the stored curve departs from them (the benchmark
    ``benchmarks.calibration`` measures by how much against every distinct score as a knot).
    As for the isotonic calibrator, runs of knots with one value are tilted upwards by
    :data:`_BLOCK_RISE` of the steps to their neighbours, so the booster's ranking survives.
    """

    x_knots: np.ndarray
    p0_knots: np.ndarray
    p1_knots: np.ndarray
    min_probability: float = 0.0
    method: str = "venn_abers"
    # The merged probability at the knots, derived from the pair (not stored).
    p_knots: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p0 = np.asarray(self.p0_knots, dtype="float64")
        p1 = np.asarray(self.p1_knots, dtype="float64")
        merged = np.maximum.accumulate(p1 / (1.0 - p0 + p1))
        # Non-decreasing and within the pair even where rounding touches the last digit.
        object.__setattr__(self, "p_knots", np.maximum(np.minimum(merged, p1), p0))

    @classmethod
    def fit(
        cls,
        raw: np.ndarray,
        labels: np.ndarray,
        min_probability: float = 0.0,
        max_knots: int | None = VENN_ABERS_KNOTS,
    ) -> VennAbersCalibrator:
        """Fit on raw scores and 0/1 labels; ``max_knots=None`` keeps every distinct score."""
        x_knots, p0, p1 = venn_abers_at_knots(raw, labels, max_knots)
        p0 = _tilt_flat_runs(np.maximum.accumulate(p0))
        p1 = np.maximum(_tilt_flat_runs(np.maximum.accumulate(p1)), p0)
        return cls(x_knots=x_knots, p0_knots=p0, p1_knots=p1, min_probability=min_probability)

    def transform_interval(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The Venn-Abers pair ``(p0, p1)`` of each raw score, within the same bounds; it
        brackets :meth:`transform`'s probability (to the last digit)."""
        x = np.asarray(raw, dtype="float64")
        p = self.transform(x)
        bounds = (self.min_probability, 1.0 - self.min_probability)
        p0 = np.clip(np.interp(x, self.x_knots, self.p0_knots), *bounds)
        p1 = np.clip(np.interp(x, self.x_knots, self.p1_knots), *bounds)
        return np.minimum(p0, p), np.maximum(p1, p)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """The merged probability, interpolated between the knots' merged values: a convex
        combination of two knots, so it stays within the interpolated pair."""
        p = np.interp(np.asarray(raw, dtype="float64"), self.x_knots, self.p_knots)
        return np.clip(p, self.min_probability, 1.0 - self.min_probability)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "x_knots": self.x_knots.tolist(),
            "p0_knots": self.p0_knots.tolist(),
            "p1_knots": self.p1_knots.tolist(),
            "min_probability": self.min_probability,
        }


def venn_abers_at_knots(
    raw: np.ndarray, labels: np.ndarray, max_knots: int | None = VENN_ABERS_KNOTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact inductive Venn-Abers pair at knot scores: ``(x_knots, p0, p1)``.

    The calibration postings are grouped by distinct raw score (weight and cancellations per
    score). For a test score tied with group ``g``, the isotonic fit with the test posting
    added is computed on a reduced problem: every block of the calibration split's own
    isotonic fit that does not contain ``g`` is pooled into one weighted point beforehand.
    That changes nothing: a block's values pool with each other whatever is added outside it,
    and pooling adjacent violators in any order gives the one isotonic fit. Each knot then
    costs the number of blocks plus the size of ``g``'s block, not the size of the split.
    """
    order = np.argsort(np.asarray(raw, dtype="float64"), kind="stable")
    x = np.asarray(raw, dtype="float64")[order]
    y = np.asarray(labels, dtype="float64")[order]
    starts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    scores = x[starts]
    weights = np.diff(np.r_[starts, len(x)]).astype("float64")
    positives = np.add.reduceat(y, starts)
    base = isotonic_regression(positives / weights, sample_weight=weights)
    block_starts = np.flatnonzero(np.r_[True, base[1:] != base[:-1]])
    block_ends = np.r_[block_starts[1:], len(base)]
    block_weights = np.add.reduceat(weights, block_starts)
    block_positives = np.add.reduceat(positives, block_starts)
    block_of = np.repeat(np.arange(len(block_starts)), block_ends - block_starts)

    knots = _knot_groups(weights, max_knots)
    p0 = np.empty(len(knots))
    p1 = np.empty(len(knots))
    for i, group in enumerate(knots):
        block = block_of[group]
        lo, hi = block_starts[block], block_ends[block]
        w = np.concatenate([block_weights[:block], weights[lo:hi], block_weights[block + 1 :]])
        t = np.concatenate(
            [block_positives[:block], positives[lo:hi], block_positives[block + 1 :]]
        )
        at = block + group - lo
        w[at] += 1.0
        p0[i] = isotonic_regression(t / w, sample_weight=w)[at]
        t[at] += 1.0
        p1[i] = isotonic_regression(t / w, sample_weight=w)[at]
    return scores[knots], p0, p1


def _knot_groups(weights: np.ndarray, max_knots: int | None) -> np.ndarray:
    """Indices of the score groups used as knots: all of them, or ``max_knots`` at
    equal-mass quantiles of the calibration split, the lowest and highest group included."""
    n = len(weights)
    if max_knots is None or n <= max_knots:
        return np.arange(n)
    cumulative = np.cumsum(weights)
    targets = np.linspace(0.0, cumulative[-1], max(2, max_knots))
    groups = np.searchsorted(cumulative, targets, side="left")
    return np.unique(np.r_[0, np.clip(groups, 0, n - 1), n - 1])


def _tilt_flat_runs(values: np.ndarray) -> np.ndarray:
    """Knot values (non-decreasing) with every run of equal values made to rise by
    :data:`_BLOCK_RISE` of the steps to its neighbours, as :func:`_rising_blocks` does.

    Values within :data:`_SAME_VALUE` of the previous one count as equal: one isotonic block's
    mean computed over different pools differs in the last digits only.
    """
    values = np.asarray(values, dtype="float64")
    if len(values) < 2:
        return values.copy()
    starts = np.flatnonzero(np.r_[True, np.diff(values) > _SAME_VALUE])
    ends = np.r_[starts[1:], len(values)] - 1
    level = values[starts]
    lo = level - _BLOCK_RISE * np.diff(level, prepend=level[0])
    hi = level + _BLOCK_RISE * np.diff(level, append=level[-1])
    run = np.repeat(np.arange(len(starts)), ends - starts + 1)
    length = (ends - starts)[run]
    share = np.divide(
        np.arange(len(values)) - starts[run],
        length,
        out=np.zeros(len(values)),
        where=length > 0,
    )
    tilted = lo[run] + share * (hi[run] - lo[run])
    return np.where(length > 0, tilted, values)


def _beta_features(raw: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(raw, dtype="float64"), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.column_stack([np.log(p), -np.log1p(-p)])


def _unregularised_logistic(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients and intercept of a practically unregularised logistic regression."""
    logistic = LogisticRegression(C=1e6, max_iter=1000)
    logistic.fit(features, labels)
    return logistic.coef_[0].astype("float64"), float(logistic.intercept_[0])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow for large ``|z|``."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# How far each isotonic block rises within itself, as a fraction of the step to its neighbours.
_BLOCK_RISE = 1e-3
# Knot values closer than this are one value (floating-point noise of one pooled mean).
_SAME_VALUE = 1e-12


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
    if method == "beta":
        return BetaCalibrator.fit(raw, labels, min_probability)
    if method == "venn_abers":
        return VennAbersCalibrator.fit(raw, labels, min_probability)
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
    if method == "beta":
        return BetaCalibrator(
            a=float(data["a"]),
            b=float(data["b"]),
            c=float(data["c"]),
            min_probability=float(data.get("min_probability", 0.0)),
        )
    if method == "venn_abers":
        return VennAbersCalibrator(
            x_knots=np.asarray(data["x_knots"], dtype="float64"),
            p0_knots=np.asarray(data["p0_knots"], dtype="float64"),
            p1_knots=np.asarray(data["p1_knots"], dtype="float64"),
            min_probability=float(data.get("min_probability", 0.0)),
        )
    raise ValueError(f"unknown calibration method {method!r}")
