"""Reason quality: the metrics on hand-made examples, TreeSHAP's reasons, the evaluation and
`cancel-risk evaluate-reasons` on a simulated history with its true causes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cancel_risk.cli import app
from core.counterfactuals import CAUSES
from core.playbook import NO_SINGLE_CAUSE
from training.reason_quality import (
    SHAP_CAUSE_FEATURES,
    TruthCausesError,
    evaluate_history_reasons,
    load_truth_causes,
    log_reason_quality,
    reason_metrics,
    shap_reasons,
)

runner = CliRunner()


def test_reason_metrics_on_a_hand_made_example():
    truth = ["price_drop", "price_drop", "tracking_quiet", "late_delivery", "buyer_profile"]
    reasons = np.array(
        [
            ["price_drop", "tracking_quiet", None],  # hit
            ["tracking_quiet", "late_delivery", "price_drop"],  # miss, but in the top three
            ["tracking_quiet", None, None],  # hit
            [NO_SINGLE_CAUSE, None, None],  # miss
            [None, None, None],  # low risk or unexplained: a miss
        ],
        dtype=object,
    )
    summary, table = reason_metrics(truth, reasons)
    assert summary == {"n": 5.0, "top1": 2 / 5, "recall_at_3": 3 / 5}
    rows = table.set_index("cause")
    assert list(rows.index) == list(CAUSES)
    assert rows.loc["price_drop", ["true", "named", "hits"]].tolist() == [2, 1, 1]
    assert rows.loc["price_drop", "precision"] == 1.0
    assert rows.loc["price_drop", "recall"] == 0.5
    assert rows.loc["tracking_quiet", ["true", "named", "hits"]].tolist() == [1, 2, 1]
    assert rows.loc["tracking_quiet", "precision"] == 0.5
    assert rows.loc["tracking_quiet", "recall"] == 1.0
    assert math.isnan(rows.loc["late_delivery", "precision"])  # never named first
    assert rows.loc["late_delivery", "recall"] == 0.0
    assert rows.loc["buyer_profile", "recall"] == 0.0
    assert math.isnan(rows.loc["slow_carrier", "recall"])  # no posting's cause


def test_reason_metrics_of_no_postings_are_nan():
    summary, table = reason_metrics([], np.empty((0, 3), dtype=object))
    assert summary["n"] == 0 and math.isnan(summary["top1"])
    assert (table["true"] == 0).all()


def test_treeshap_reasons_sum_each_causes_features_and_rank_the_positive_ones():
    columns = [
        "price_change_pct",
        "lowest_price_change_pct",
        "hours_since_order",
        "noise",
        "carrier",
    ]
    contributions = np.array(
        [
            # price 0.3 + 0.2, remorse 0.4, carrier -0.1; the last column is the expected value
            [0.3, 0.2, 0.4, 5.0, -0.1, -2.0],
            [-0.3, 0.1, 0.0, 1.0, 0.2, -2.0],
            [-0.1, 0.0, -0.2, 9.0, -0.3, -2.0],
        ]
    )
    reasons = shap_reasons(contributions, columns)
    assert reasons.shape == (3, 3)
    assert reasons[0].tolist() == ["price_drop", "early_remorse", None]
    assert reasons[1].tolist() == ["slow_carrier", None, None]  # price sums to -0.2
    assert reasons[2].tolist() == [None, None, None]  # a feature of no cause is no reason


def test_every_cause_has_treeshap_features_of_the_model():
    from core.features import FEATURE_COLUMNS

    assert set(SHAP_CAUSE_FEATURES) == set(CAUSES)
    grouped = [f for features in SHAP_CAUSE_FEATURES.values() for f in features]
    assert len(grouped) == len(set(grouped))  # each feature in one cause
    assert set(grouped) <= set(FEATURE_COLUMNS)


def test_a_history_without_truth_causes_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TruthCausesError, match="--truth"):
        load_truth_causes(tmp_path)


@pytest.fixture(scope="module")
def quality(simulated_history: Path, tiny_model_dir: Path):
    from core.ingest import load_history
    from core.model import RiskModel

    return evaluate_history_reasons(
        RiskModel.load(tiny_model_dir), load_history(simulated_history), simulated_history
    )


def test_the_evaluation_keeps_the_risky_postings_with_a_true_cause(quality, simulated_history):
    truth = load_truth_causes(simulated_history)
    evaluated = quality.evaluated
    assert 0 < len(evaluated) <= quality.medium_high <= quality.open_postings <= len(truth)
    assert (evaluated["dominant_cause"] != "none").all()
    dominant = truth.set_index("posting_number")["dominant_cause"]
    expected = dominant.loc[evaluated["posting_number"]].to_numpy()
    assert (expected == evaluated["dominant_cause"].to_numpy()).all()
    assert quality.per_cause["true"].sum() == len(evaluated)
    for method in ("ours", "treeshap"):
        top1 = (evaluated[f"{method}_1"] == evaluated["dominant_cause"]).mean()
        assert quality.summary[method]["top1"] == pytest.approx(top1)
        assert quality.summary[method]["top1"] <= quality.summary[method]["recall_at_3"]
        assert quality.per_cause[f"{method}_hits"].sum() == round(top1 * len(evaluated))


def test_the_metrics_go_to_mlflow(quality, tracking_uri):
    with mlflow.start_run() as run:
        log_reason_quality(quality)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["reasons/ours_top1"] == pytest.approx(quality.summary["ours"]["top1"])
    assert "reasons/treeshap_recall_at_3" in logged
    assert all(math.isfinite(v) for v in logged.values())


def test_evaluate_reasons_command(simulated_history: Path, tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "reasons.json"
    result = runner.invoke(
        app,
        [
            "evaluate-reasons",
            "--history",
            str(simulated_history),
            "--model",
            str(tiny_model_dir),
            "--out-json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "treeshap" in result.output
    assert "slow_carrier" in result.output
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"ours", "treeshap"}
    assert report["evaluated"] > 0
    assert [row["cause"] for row in report["per_cause"]] == list(CAUSES)


def test_evaluate_reasons_without_truth_causes_fails_clearly(
    simulated_history: Path, tiny_model_dir: Path, tmp_path: Path
):
    history = tmp_path / "history"
    history.mkdir()
    for path in simulated_history.iterdir():
        if path.name != "truth_causes.csv":
            (history / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(
        app, ["evaluate-reasons", "--history", str(history), "--model", str(tiny_model_dir)]
    )
    assert result.exit_code == 2
    assert "truth_causes.csv" in result.output


def test_truth_causes_frame_reads_back(simulated_history: Path):
    frame = load_truth_causes(simulated_history)
    assert frame["posting_number"].dtype == pd.StringDtype()
    assert set(frame["dominant_cause"]) <= {*CAUSES, "none"}
