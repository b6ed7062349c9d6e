"""Evaluation plots, rendered off-screen to PNG bytes (logged as MLflow artifacts).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through
``pyplot``: no global figure state, no display needed, safe in a server or a test.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import lightgbm as lgb
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.evaluate import build_calibration_table

_DPI = 110


def render_png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def plot_calibration_curve(
    labels: np.ndarray,
    probabilities: Mapping[str, np.ndarray],
    n_bins: int = 10,
) -> Figure:
    """Observed cancellation rate against mean probability per equal-mass bin, per model."""
    figure = Figure(figsize=(5.5, 5))
    ax = figure.add_subplot()
    upper = 0.0
    for name, p in probabilities.items():
        table = build_calibration_table(labels, p, n_bins)
        ax.plot(table["mean_probability"], table["observed_rate"], marker="o", label=name)
        upper = max(upper, table["mean_probability"].max(), table["observed_rate"].max())
    upper = min(1.0, upper * 1.1 or 1.0)
    ax.plot([0, upper], [0, upper], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, upper)
    ax.set_ylim(0, upper)
    ax.set_xlabel("mean predicted probability (equal-mass bins)")
    ax.set_ylabel("observed buyer-cancellation rate")
    ax.set_title("Calibration on the holdout")
    ax.legend(loc="upper left", fontsize="small")
    return figure


def plot_feature_importance(booster: lgb.Booster, top_n: int = 25) -> Figure:
    """Total gain of each feature's splits, the largest ``top_n``."""
    gain = pd.Series(
        booster.feature_importance(importance_type="gain"), index=booster.feature_name()
    )
    gain = gain[gain > 0].sort_values().tail(top_n)
    figure = Figure(figsize=(7, max(3.0, 0.28 * len(gain) + 1)))
    ax = figure.add_subplot()
    ax.barh(gain.index, gain.to_numpy())
    ax.set_xlabel("total gain")
    ax.set_title("Feature importance (gain)")
    return figure


def plot_slice_metrics(slice_metrics: pd.DataFrame, metric: str = "roc_auc") -> Figure:
    """One panel per slice column: ``metric`` per slice value, with each value's row count."""
    slices = list(dict.fromkeys(slice_metrics["slice"]))
    figure = Figure(figsize=(5 * max(1, len(slices)), 4))
    for i, name in enumerate(slices, start=1):
        ax = figure.add_subplot(1, len(slices), i)
        part = slice_metrics[slice_metrics["slice"] == name]
        positions = np.arange(len(part))
        bars = ax.bar(positions, part[metric].to_numpy(dtype="float64"))
        # Explicit ticks: slice values such as carrier ids are labels, not numbers.
        ax.set_xticks(positions, [str(v) for v in part["value"]])
        for bar, n in zip(bars, part["n"], strict=True):
            ax.annotate(
                f"n={int(n)}",
                (bar.get_x() + bar.get_width() / 2, 0),
                ha="center",
                va="bottom",
                fontsize="x-small",
                rotation=90,
                color="white",
            )
        ax.set_title(name)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=45)
    figure.suptitle(f"Holdout {metric} by slice")
    return figure


def plot_shap_summary(
    contributions: np.ndarray,
    matrix: np.ndarray,
    feature_names: Sequence[str],
    top_n: int = 20,
) -> Figure:
    """A beeswarm of per-posting contributions (log-odds), coloured by the feature's value.

    ``contributions`` is LightGBM's ``pred_contrib=True`` output (the last column, the expected
    value, is dropped here). Colours are the value's rank within the feature (missing: grey), so
    numeric and categorical-code features share one scale.
    """
    contrib = contributions[:, : len(feature_names)]
    importance = np.abs(contrib).mean(axis=0)
    order = np.argsort(importance)[::-1][:top_n][::-1]
    figure = Figure(figsize=(8, max(3.0, 0.32 * len(order) + 1)))
    ax = figure.add_subplot()
    rng = np.random.default_rng(0)
    scatter = None
    for row, j in enumerate(order):
        values = matrix[:, j]
        known = ~np.isnan(values)
        colour = np.full(len(values), np.nan)
        if known.any():
            ranks = pd.Series(values[known]).rank(pct=True).to_numpy()
            colour[known] = ranks
        jitter = rng.uniform(-0.3, 0.3, len(values))
        ax.scatter(contrib[~known, j], row + jitter[~known], s=4, color="lightgrey")
        scatter = ax.scatter(
            contrib[known, j], row + jitter[known], s=4, c=colour[known], cmap="coolwarm"
        )
    ax.set_yticks(range(len(order)), [feature_names[j] for j in order])
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("contribution to the log-odds of a buyer cancellation")
    ax.set_title("SHAP summary (LightGBM pred_contrib, holdout sample)")
    if scatter is not None:
        bar = figure.colorbar(scatter, ax=ax)
        bar.set_label("feature value (rank: low → high)")
    return figure
