"""Evaluation metrics against values computed by hand, and the slice and comparison tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from training.evaluate import (
    brier_score,
    build_calibration_table,
    build_comparison_table,
    build_slice_values,
    compute_metrics,
    compute_slice_metrics,
    expected_calibration_error,
    log_loss,
    precision_recall_at_top,
)

LABELS = np.array([0, 0, 1, 1])
PROBABILITIES = np.array([0.1, 0.2, 0.7, 0.9])


def test_log_loss_and_brier_match_hand_computation() -> None:
    expected_log_loss = -(math.log(0.9) + math.log(0.8) + math.log(0.7) + math.log(0.9)) / 4
    expected_brier = (0.1**2 + 0.2**2 + 0.3**2 + 0.1**2) / 4
    assert log_loss(LABELS, PROBABILITIES) == pytest.approx(expected_log_loss)
    assert brier_score(LABELS, PROBABILITIES) == pytest.approx(expected_brier)


def test_log_loss_stays_finite_for_a_certain_mistake() -> None:
    assert math.isfinite(log_loss(np.array([1]), np.array([0.0])))


def test_ece_uses_equal_mass_bins() -> None:
    # Two bins of two postings: |0 - 0.15| and |1 - 0.8|, each weighted one half.
    assert expected_calibration_error(LABELS, PROBABILITIES, n_bins=2) == pytest.approx(0.175)
    table = build_calibration_table(LABELS, PROBABILITIES, n_bins=2)
    assert table["n"].tolist() == [2, 2]
    assert table["mean_probability"].tolist() == pytest.approx([0.15, 0.8])
    assert table["observed_rate"].tolist() == [0.0, 1.0]


def test_ece_bins_hold_equal_counts_even_when_probabilities_cluster() -> None:
    # Equal-width bins would put nine of the ten postings into [0, 0.1).
    p = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.95])
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    table = build_calibration_table(y, p, n_bins=5)
    assert table["n"].tolist() == [2, 2, 2, 2, 2]
    gaps = [0.015, 0.035, 0.055, 0.075, abs(1 - (0.09 + 0.95) / 2)]
    assert expected_calibration_error(y, p, n_bins=5) == pytest.approx(np.mean(gaps))


def test_perfect_calibration_has_zero_ece() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([0.5, 0.5, 0.5, 0.5])
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.0)


def test_precision_and_recall_in_the_top_fraction() -> None:
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 1, 0])
    p = np.array([0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.1])
    # Top 20 % = the two highest (0.9: positive, 0.8: negative).
    precision, recall = precision_recall_at_top(y, p, fraction=0.2)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(1 / 3)
    # 25 % of 10 rounds up to three postings: two of the three positives.
    precision, recall = precision_recall_at_top(y, p, fraction=0.25)
    assert precision == pytest.approx(2 / 3)
    assert recall == pytest.approx(2 / 3)


def test_compute_metrics_hand_example() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    metrics = compute_metrics(y, p, ece_bins=2, top_fraction=0.5)
    # Every positive outranks every negative.
    assert metrics["roc_auc"] == pytest.approx(1.0)
    assert metrics["pr_auc"] == pytest.approx(1.0)
    # With 0.3 for the first positive, one of the four (positive, negative) pairs is misordered.
    swapped = compute_metrics(y, np.array([0.1, 0.3, 0.35, 0.8]), ece_bins=2)
    assert swapped["roc_auc"] == pytest.approx(0.75)
    # Average precision: ranks 0.8 (pos), 0.35 (neg), 0.3 (pos): (1/1 + 2/3) / 2.
    assert swapped["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["precision_top"] == pytest.approx(1.0)
    assert metrics["recall_top"] == pytest.approx(1.0)
    assert metrics["n"] == 4
    assert metrics["positives"] == 2
    assert metrics["base_rate"] == pytest.approx(0.5)


def test_ranking_metrics_are_nan_for_a_single_class() -> None:
    metrics = compute_metrics(np.zeros(5, dtype=int), np.linspace(0.1, 0.5, 5))
    assert math.isnan(metrics["roc_auc"])
    assert math.isnan(metrics["pr_auc"])
    assert metrics["brier"] == pytest.approx(np.mean(np.linspace(0.1, 0.5, 5) ** 2))


def _slice_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "carrier_id": pd.array([1] * 40 + [2] * 40 + [3] * 5 + [None] * 2, dtype="Int64"),
            "days_since_order": [0.0, 0.5, 1.0, 2.0, 3.9, 4.0, 7.5, 8.0, 30.0] * 9 + [np.nan] * 6,
            "is_handed_over": pd.array([True, False] * 43 + [None], dtype="boolean"),
            "label": [0, 1] * 43 + [1],
        }
    )


def test_slice_values_bucket_days_and_pool_rare_carriers() -> None:
    slices = build_slice_values(_slice_frame(), min_rows=30)
    assert slices["days_since_order"].iloc[:9].tolist() == [
        "0",
        "0",
        "1",
        "2-3",
        "2-3",
        "4-7",
        "4-7",
        "8+",
        "8+",
    ]
    assert slices["days_since_order"].iloc[-1] == "unknown"
    assert set(slices["carrier_id"]) == {"1", "2", "other"}
    assert slices["is_handed_over"].iloc[-1] == "unknown"


def test_slice_metrics_cover_every_slice_value_once() -> None:
    frame = _slice_frame()
    p = np.linspace(0.05, 0.95, len(frame))
    table = compute_slice_metrics(frame, p, min_rows=30)
    assert set(table["slice"]) == {"carrier_id", "days_since_order", "is_handed_over"}
    for _, part in table.groupby("slice"):
        assert part["n"].sum() == len(frame)
    carrier_one = table[(table["slice"] == "carrier_id") & (table["value"] == "1")].iloc[0]
    mask = frame["carrier_id"].eq(1).to_numpy(dtype=bool, na_value=False)
    assert carrier_one["brier"] == pytest.approx(brier_score(frame["label"][mask], p[mask]))


def test_comparison_table_lists_model_baselines_and_truth() -> None:
    metrics = {"roc_auc": 0.8, "pr_auc": 0.5, "brier": 0.1, "log_loss": 0.3, "ece": 0.01}
    table = build_comparison_table(
        metrics,
        {"logistic": {**metrics, "roc_auc": 0.7}, "static_lightgbm": {**metrics, "roc_auc": 0.6}},
        {"model_roc_auc": 0.79, "truth_roc_auc": 0.83, "truth_brier": 0.09},
    )
    assert table["name"].tolist() == [
        "model",
        "logistic",
        "static_lightgbm",
        "model",
        "true_probability",
    ]
    assert table["population"].tolist()[-2:] == ["open_at_export", "open_at_export"]
    assert table["roc_auc"].tolist() == pytest.approx([0.8, 0.7, 0.6, 0.79, 0.83])
    assert math.isnan(table["pr_auc"].iloc[-1])


def test_slices_include_the_region_and_the_payment_type_when_known() -> None:
    frame = _slice_frame().assign(
        region=["Москва"] * 50 + ["Омская область"] * 35 + [None] * 2,
        payment_type=["СБП"] * 80 + ["Оплата при получении"] * 7,
    )
    p = np.linspace(0.05, 0.95, len(frame))
    table = compute_slice_metrics(frame, p, min_rows=30)
    assert set(table["slice"]) == {
        "carrier_id",
        "days_since_order",
        "is_handed_over",
        "region",
        "payment_type",
    }
    regions = table[table["slice"] == "region"].set_index("value")["n"].to_dict()
    assert regions == {"Москва": 50, "Омская область": 35, "other": 2}
    payments = table[table["slice"] == "payment_type"].set_index("value")["n"].to_dict()
    assert payments == {"СБП": 80, "other": 7}
    assert "ece" in table.columns
