"""MLflow registry: promotion only when better, the logged model's contract, a real server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import lightgbm
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from benchmarks.harness import stop_process
from core.features import FEATURE_VERSION
from core.model import IncompatibleModelError, RiskModel
from core.pyfunc import load_risk_model
from training.config import PromotionConfig, load_training_config
from training.fit import fit_risk_model
from training.registry import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    PromotionError,
    ensure_experiment,
    is_better,
    log_holdout,
    log_risk_model,
    project_pip_requirements,
    promote_if_better,
    set_alias,
)

if TYPE_CHECKING:
    from conftest import SyntheticSet

NAME = "cancel-risk"
SERVER_START_TIMEOUT_S = 120


# --- promotion on synthetic models ---------------------------------------------------------


@pytest.fixture(scope="module")
def models(synthetic_set: SyntheticSet, fast_training: dict) -> dict[str, RiskModel]:
    """A model on all features and one that only sees noise and the region."""
    config = load_training_config(overrides=fast_training)

    def fit(columns: list[str], version: str = FEATURE_VERSION) -> RiskModel:
        return fit_risk_model(
            synthetic_set.frame,
            config,
            feature_columns=columns,
            categorical_columns=synthetic_set.categorical_columns,
            feature_version=version,
        )

    return {
        "good": fit(synthetic_set.feature_columns),
        "bad": fit(["noise", "region"]),
        "old_features": fit(synthetic_set.feature_columns, version=f"{FEATURE_VERSION}-old"),
    }


def _register(model: RiskModel, holdout: pd.DataFrame) -> str:
    """Log ``model`` with ``holdout`` in a run, register it, and make it the challenger."""
    with mlflow.start_run(experiment_id=ensure_experiment(NAME)):
        log_holdout(holdout)
        info = log_risk_model(model, input_example=None, registered_model_name=NAME)
    version = str(info.registered_model_version)
    set_alias(NAME, CHALLENGER_ALIAS, version)
    return version


def _champion() -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, CHAMPION_ALIAS).version)


def test_promotion_happens_only_when_the_challenger_is_better(
    models: dict[str, RiskModel], synthetic_set: SyntheticSet, tracking_uri: str
) -> None:
    config = load_training_config()
    holdout = synthetic_set.frame[synthetic_set.frame["split"] == "test"]

    def promote():
        return promote_if_better(NAME, config.promotion, config.evaluation)

    bad = _register(models["bad"], holdout)
    first = promote()
    assert first.promoted and first.reason == "no champion yet"
    assert _champion() == bad

    good = _register(models["good"], holdout)
    better = promote()
    assert better.promoted
    assert better.champion_version == bad
    assert better.challenger_value < better.champion_value  # log loss: lower is better
    assert _champion() == good

    worse = promote_version = _register(models["bad"], holdout)
    refused = promote()
    assert not refused.promoted
    assert refused.challenger_version == promote_version
    assert "does not beat" in refused.reason
    assert _champion() == good
    assert worse != good

    # The same model again ties with the champion: no gain, no promotion.
    _register(models["good"], holdout)
    tie = promote()
    assert not tie.promoted
    assert tie.challenger_value == pytest.approx(tie.champion_value)
    assert _champion() == good


def test_a_champion_of_another_feature_version_is_replaced(
    models: dict[str, RiskModel], synthetic_set: SyntheticSet, tracking_uri: str
) -> None:
    config = load_training_config()
    holdout = synthetic_set.frame[synthetic_set.frame["split"] == "test"]
    old = _register(models["old_features"], holdout)
    set_alias(NAME, CHAMPION_ALIAS, old)
    new = _register(models["bad"], holdout)
    result = promote_if_better(NAME, config.promotion, config.evaluation)
    assert result.promoted
    assert "feature version" in result.reason
    assert _champion() == new


def test_promoting_an_unknown_version_is_a_clear_error(tracking_uri: str) -> None:
    config = load_training_config()
    with pytest.raises(PromotionError, match="no 'challenger'"):
        promote_if_better(NAME, config.promotion, config.evaluation)


@pytest.mark.parametrize(
    ("metric", "challenger", "champion", "better"),
    [
        ("log_loss", 0.30, 0.302, True),
        ("log_loss", 0.30, 0.3005, False),  # better, but by less than the margin
        ("log_loss", 0.31, 0.30, False),
        ("roc_auc", 0.81, 0.80, True),
        ("roc_auc", 0.80, 0.81, False),
        ("brier", 0.10, 0.10, False),
    ],
)
def test_is_better_respects_direction_and_margin(
    metric: str, challenger: float, champion: float, better: bool
) -> None:
    promotion = PromotionConfig(metric=metric, min_improvement=0.001)
    assert is_better(challenger, champion, promotion) is better


# --- the logged model ----------------------------------------------------------------------


def test_pip_requirements_pin_the_scoring_stack() -> None:
    requirements = project_pip_requirements()
    assert f"lightgbm=={lightgbm.__version__}" in requirements
    assert f"mlflow=={mlflow.__version__}" in requirements
    assert f"pandas=={pd.__version__}" in requirements
    assert not any(r.startswith(("pytest", "ruff", "hypothesis")) for r in requirements)


def test_logged_model_is_built_from_code_and_carries_the_package(
    models: dict[str, RiskModel], synthetic_set: SyntheticSet, tracking_uri: str
) -> None:
    holdout = synthetic_set.frame[synthetic_set.frame["split"] == "test"]
    version = _register(models["good"], holdout)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}"))
    flavor = mlflow.models.Model.load(model_dir).flavors["python_function"]
    assert "model_code_path" in flavor  # "models from code": no pickled Python object
    assert not list(model_dir.rglob("*.pkl"))
    assert (model_dir / "code" / "core" / "model.py").is_file()
    assert not list((model_dir / "code").rglob("__pycache__"))
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert f"lightgbm=={lightgbm.__version__}" in requirements
    loaded = load_risk_model(f"models:/{NAME}@{CHALLENGER_ALIAS}")
    assert np.array_equal(loaded.score_features(holdout), models["good"].score_features(holdout))


def test_a_logged_model_loads_from_its_files_without_running_its_code(
    models: dict[str, RiskModel], synthetic_set: SyntheticSet, tracking_uri: str, tmp_path: Path
) -> None:
    """The service and the batch read a logged model's RiskModel files with their own code: a
    model logged by an older layout of the project (its code under another package) still
    loads, and code shipped inside a model never runs."""
    holdout = synthetic_set.frame[synthetic_set.frame["split"] == "test"]
    version = _register(models["good"], holdout)
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}"))
    older = Path(shutil.copytree(logged, tmp_path / "older-layout"))
    shutil.rmtree(older / "code" / "core")
    (older / "code" / "training").mkdir()
    (older / "code" / "training" / "__init__.py").write_text("raise RuntimeError('ran')\n")
    (older / "cancel_risk_model.py").write_text("raise RuntimeError('ran')\n")
    loaded = load_risk_model(str(older))
    assert np.array_equal(loaded.score_features(holdout), models["good"].score_features(holdout))
    shutil.rmtree(older / "artifacts" / "risk_model")
    with pytest.raises(IncompatibleModelError, match="no artifacts/risk_model"):
        load_risk_model(str(older))


# --- raw records through the pyfunc --------------------------------------------------------


@pytest.fixture(scope="module")
def history_model(simulated_history: Path, fast_training: dict):
    """A model trained on the simulated history, with the history's tables and export moment."""
    from core.features import CATEGORICAL_COLUMNS, FEATURE_COLUMNS
    from core.ingest import load_history
    from training.dataset import build_training_set, fit_training_aggregates

    config = load_training_config(overrides=fast_training)
    tables = load_history(simulated_history)
    as_of = tables.latest_event_at()
    aggregates = fit_training_aggregates(tables, as_of, config.snapshots)
    training_set = build_training_set(tables, as_of, config.snapshots, aggregates=aggregates)
    model = fit_risk_model(
        training_set,
        config,
        feature_columns=FEATURE_COLUMNS,
        categorical_columns=CATEGORICAL_COLUMNS,
        feature_version=FEATURE_VERSION,
        aggregates=aggregates,
    )
    return model, tables, as_of


def test_raw_records_score_like_the_tables_in_input_order(history_model) -> None:
    from core.features import open_postings_at
    from core.pyfunc import build_input_example, score_records

    model, tables, as_of = history_model
    numbers = list(open_postings_at(tables, as_of)[:4])
    records = build_input_example(tables, numbers, as_of).iloc[::-1].reset_index(drop=True)
    scores = score_records(model, records)
    assert scores["posting_number"].tolist() == numbers[::-1]
    expected = model.score_tables(tables, as_of).set_index("posting_number")
    np.testing.assert_allclose(
        scores["probability"], expected.loc[numbers[::-1], "probability"], rtol=1e-9
    )
    assert scores["risk_level"].tolist() == expected.loc[numbers[::-1], "risk_level"].tolist()


def test_a_posting_closed_at_its_as_of_gets_no_score(history_model) -> None:
    from core.pyfunc import build_input_example, score_records

    model, tables, _ = history_model
    delivered = tables.postings.loc[tables.postings["delivered_at"].notna()].iloc[0]
    number = delivered["posting_number"]
    before = delivered["delivered_at"] - pd.Timedelta(hours=1)
    after = delivered["delivered_at"] + pd.Timedelta(hours=1)
    scores = score_records(model, build_input_example(tables, [number, number], before))
    assert scores["probability"].between(0, 1).all()
    # After its delivery push the posting is no longer open: no score, no level.
    scores = score_records(model, build_input_example(tables, [number], after))
    assert scores["posting_number"].tolist() == [number]
    assert np.isnan(scores["probability"].iloc[0])
    assert scores["risk_level"].isna().all()


def test_malformed_records_name_the_row(history_model) -> None:
    from core.pyfunc import score_records

    model, _, _ = history_model
    records = pd.DataFrame({"posting": ['{"posting_number": "1-1-1"}', "{not json"]})
    with pytest.raises(ValueError, match="row 1: 'posting' is not valid JSON"):
        score_records(model, records)
    with pytest.raises(ValueError, match="'posting' column"):
        score_records(model, pd.DataFrame({"order": ["{}"]}))


# --- a real tracking server ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture
def mlflow_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_tracking_db: Path
) -> Iterator[str]:
    """A real ``mlflow server`` on loopback with a SQLite backend and an artifact directory."""
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    (server_dir / "mlflow.db").write_bytes(empty_tracking_db.read_bytes())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = server_dir / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}"),
        *("--artifacts-destination", str(server_dir / "artifacts")),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=server_dir,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the teardown stops every worker
            # The job runner (huey) is not needed for tracking and registry; it slows start-up.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    try:
        _wait_until_healthy(url, process, log)
        client_dir = tmp_path / "client"
        client_dir.mkdir()
        monkeypatch.chdir(client_dir)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        yield url
    finally:
        mlflow.set_tracking_uri(None)
        stop_process(process)


@pytest.mark.slow
def test_train_register_load_cycle_against_a_real_server(
    mlflow_server: str, simulated_history: Path, fast_training: dict, tmp_path: Path
) -> None:
    from training.train import promote_if_better_than_champion, train_from_history

    config = load_training_config(overrides=fast_training)
    result = train_from_history(simulated_history, config=config, promote_if_better=True)
    assert result.model_version == "1"
    assert result.promoted
    assert result.truth_metrics is not None
    again = promote_if_better_than_champion(config)
    assert not again.promoted
    assert again.reason == "version 1 is already the champion"

    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, CHAMPION_ALIAS).version) == "1"
    assert client.get_run(result.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    # The artifacts went through the server into its directory, none into the client's.
    assert list((tmp_path / "server" / "artifacts").rglob("booster.txt"))
    assert not list((tmp_path / "client").rglob("booster.txt"))

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION_ALIAS}")
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    example = json.loads((model_dir / "input_example.json").read_text())
    scores = loaded.predict(pd.DataFrame(example["data"], columns=example["columns"]))
    assert scores["probability"].between(0, 1).all()
    assert loaded.unwrap_python_model().risk_model.feature_version == FEATURE_VERSION
