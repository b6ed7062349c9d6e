"""The training config, and `cancel-risk train` / `promote` end to end on a simulated history."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cancel_risk.cli import app
from training.config import ConfigError, TrainingConfig, load_training_config
from training.dataset import SnapshotConfig

runner = CliRunner()


def _write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# --- config --------------------------------------------------------------------------------


def test_default_config_is_the_models_defaults() -> None:
    config = load_training_config()
    assert config == TrainingConfig()
    assert config.snapshots == SnapshotConfig()
    assert config.lightgbm.n_jobs == 2
    assert config.mlflow.experiment_name == "cancel-risk"
    assert config.mlflow.registered_model_name == "cancel-risk"


def test_a_file_and_overrides_merge_over_the_defaults(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.yaml", {"lightgbm": {"learning_rate": 0.1}})
    config = load_training_config(path, overrides={"calibration": {"method": "sigmoid"}})
    assert config.lightgbm.learning_rate == 0.1
    assert config.lightgbm.num_leaves == TrainingConfig().lightgbm.num_leaves
    assert config.calibration.method == "sigmoid"
    assert config.calibration.min_probability == TrainingConfig().calibration.min_probability


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"lightgbm": {"learning_rat": 0.1}}, "lightgbm.learning_rat"),
        ({"calibration": {"method": "magic"}}, "calibration.method"),
        ({"snapshots": {"every_hour": 12}}, "snapshots.every_hour"),
        ({"costs": {"contact_effect": 1.5}}, "costs.contact_effect"),
        ({"promotion": {"metric": "accuracy"}}, "promotion.metric"),
        ({"trainer": {}}, "trainer"),
    ],
)
def test_a_bad_config_names_the_field(tmp_path: Path, data: dict, field: str) -> None:
    path = _write_config(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_training_config(path)


def test_costs_must_make_hold_the_stronger_intervention() -> None:
    with pytest.raises(ConfigError, match="hold_effect must be larger"):
        load_training_config(overrides={"costs": {"contact_effect": 0.6, "hold_effect": 0.5}})


def test_config_yaml_round_trips(tmp_path: Path) -> None:
    config = load_training_config(overrides={"lightgbm": {"num_leaves": 15}})
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    assert load_training_config(path) == config


# --- CLI errors ----------------------------------------------------------------------------


def test_train_with_a_bad_config_exits_2_with_one_message(
    tmp_path: Path, simulated_history: Path, tracking_uri: str
) -> None:
    path = _write_config(tmp_path / "bad.yaml", {"lightgbm": {"num_leaves": "many"}})
    result = runner.invoke(
        app, ["train", "--history", str(simulated_history), "--config", str(path)]
    )
    assert result.exit_code == 2
    assert "lightgbm.num_leaves" in result.stderr
    assert "Traceback" not in result.output


def test_train_without_a_history_exits_2(tmp_path: Path, tracking_uri: str) -> None:
    result = runner.invoke(app, ["train", "--history", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:")


def test_train_with_a_bad_as_of_exits_2(simulated_history: Path, tracking_uri: str) -> None:
    result = runner.invoke(app, ["train", "--history", str(simulated_history), "--as-of", "soon"])
    assert result.exit_code == 2
    assert "--as-of" in result.stderr


def test_promote_without_a_challenger_exits_2(tracking_uri: str) -> None:
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 2
    assert "challenger" in result.stderr


# --- the smoke run -------------------------------------------------------------------------


def test_train_registers_promotes_and_the_model_scores_raw_records(
    tmp_path: Path, simulated_history: Path, tracking_uri: str, fast_training: dict
) -> None:
    config = _write_config(tmp_path / "fast.yaml", fast_training)
    result = runner.invoke(
        app,
        [
            "train",
            "--history",
            str(simulated_history),
            "--config",
            str(config),
            "--promote-if-better",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    run_id = lines[0].removeprefix("run id: ")
    assert lines[1] == "registered: cancel-risk v1"
    table = "\n".join(lines)
    for name in ("model", "logistic", "static_lightgbm", "true_probability"):
        assert name in table
    assert "promoted to champion: no champion yet" in table
    (quality,) = [line for line in lines if line.startswith("reasons vs the simulator's causes")]
    assert re.search(r"top-1 \d+\.\d%, recall@3 \d+\.\d% \(TreeSHAP", quality)

    client = MlflowClient()
    assert str(client.get_model_version_by_alias("cancel-risk", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("cancel-risk", "challenger").version) == "1"
    run = client.get_run(run_id)
    for key in ("holdout/roc_auc", "baseline_logistic/roc_auc", "baseline_static_lightgbm/ece"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.metrics["truth/truth_roc_auc"] > 0.5
    assert "truth/model_brier" in run.data.metrics
    assert 0.0 <= run.data.metrics["reasons/ours_top1"] <= 1.0
    assert 0.0 <= run.data.metrics["reasons/treeshap_recall_at_3"] <= 1.0
    evaluation = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/reason_quality.csv" in evaluation
    assert len(run.data.params["dataset_digest"]) == 16
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {
        "plots/calibration_curve.png",
        "plots/feature_importance.png",
        "plots/shap_summary.png",
        "plots/slice_metrics.png",
    }
    logged_config = yaml.safe_load(
        mlflow.artifacts.load_text(f"runs:/{run_id}/config/training_config.yaml")
    )
    assert (
        logged_config["lightgbm"]["num_boost_round"] == fast_training["lightgbm"]["num_boost_round"]
    )

    # The registered pyfunc: raw Seller API records in, scores out, equal to scoring tables.
    loaded = mlflow.pyfunc.load_model("models:/cancel-risk@champion")
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/cancel-risk@champion"))
    example = json.loads((model_dir / "input_example.json").read_text())
    records = pd.DataFrame(example["data"], columns=example["columns"])
    scores = loaded.predict(records)
    assert list(scores.columns) == ["posting_number", "probability", "risk_level"]
    assert scores["probability"].between(0, 1).all()
    assert set(scores["risk_level"]) <= {"low", "medium", "high"}

    from core.ingest import load_history

    risk_model = loaded.unwrap_python_model().risk_model
    assert risk_model.aggregates is not None
    for key in ("holdout_metrics", "truth_metrics", "training_period", "reference_values"):
        assert risk_model.metadata[key], key
    as_of = pd.Timestamp(records["as_of"].iloc[0])
    by_tables = risk_model.score_tables(load_history(simulated_history), as_of)
    by_tables = by_tables.set_index("posting_number").loc[scores["posting_number"]]
    np.testing.assert_allclose(scores["probability"], by_tables["probability"], rtol=1e-9)

    # A single posting without events and without as_of is still scored (now, no events).
    bare = loaded.predict(records[["posting"]].iloc[:1])
    assert len(bare) == 1


def test_promote_of_the_current_champion_changes_nothing(
    tmp_path: Path, simulated_history: Path, tracking_uri: str, fast_training: dict
) -> None:
    config = _write_config(tmp_path / "fast.yaml", fast_training)
    export_at = pd.Timestamp(pd.read_csv(simulated_history / "truth.csv")["as_of"].iloc[0])
    as_of = export_at - pd.Timedelta(days=5)
    trained = runner.invoke(
        app,
        [
            *("train", "--history", str(simulated_history), "--config", str(config)),
            *("--as-of", as_of.isoformat(), "--promote-if-better"),
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert f"as of: {as_of.isoformat()}" in trained.stdout
    run_id = trained.stdout.splitlines()[0].removeprefix("run id: ")
    period_end = MlflowClient().get_run(run_id).data.params["dataset_period_end"]
    assert pd.Timestamp(period_end) <= as_of
    result = runner.invoke(app, ["promote", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "version 1 not promoted: version 1 is already the champion" in result.stdout
    missing = runner.invoke(app, ["promote", "--version", "7", "--config", str(config)])
    assert missing.exit_code == 2
    assert "no version 7" in missing.stderr
