"""Shared fixtures: a synthetic training set, a simulated history, an isolated MLflow store,
a real PostgreSQL server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from benchmarks.postgres import PostgresUnavailable, start_postgres


@pytest.fixture(scope="session")
def fast_training() -> dict:
    """Config overrides that keep a test's training run short (read them, do not mutate)."""
    # One thread: tiny data gains nothing from a pool, and pools stall on a busy machine.
    return {"lightgbm": {"num_boost_round": 60, "early_stopping_rounds": 10, "n_jobs": 1}}


@dataclass(frozen=True)
class SyntheticSet:
    """A frame shaped like ``build_training_set``'s output, with the probabilities behind it."""

    frame: pd.DataFrame
    true_probability: np.ndarray
    feature_columns: list[str]
    categorical_columns: list[str]
    static_columns: list[str]


def make_synthetic_set(n: int = 4000, seed: int = 0) -> SyntheticSet:
    """Postings whose buyer-cancellation probability depends on a few known features.

    Splits are by time as in the real training set: train, then valid, calibration and test.
    """
    rng = np.random.default_rng(seed)
    carrier = rng.choice(["11", "22", "33", "44"], n)
    region = rng.choice(["north", "south", "east"], n)
    price_change_pct = rng.normal(0.0, 10.0, n)
    hours_quiet = rng.exponential(24.0, n)
    is_premium = (rng.random(n) < 0.2).astype("float64")
    days_since_order = rng.integers(0, 12, n)
    logit = (
        -2.2
        + 0.12 * np.clip(-price_change_pct, 0, None)
        + 0.025 * hours_quiet
        - 1.0 * is_premium
        + 1.2 * (carrier == "44")
    )
    probability = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < probability).astype("int64")
    ordered_at = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(
        np.sort(rng.uniform(0, 100, n)), unit="D"
    )
    position = np.arange(n) / n
    split = np.select(
        [position < 0.6, position < 0.75, position < 0.87],
        ["train", "valid", "calibration"],
        "test",
    )
    price = price_change_pct.copy()
    price[rng.random(n) < 0.1] = np.nan  # a missing price log
    frame = pd.DataFrame(
        {
            "posting_number": pd.array([f"{100000 + i}-0001-1" for i in range(n)], dtype="string"),
            "as_of": ordered_at,
            "ordered_at": ordered_at,
            "label": label,
            "split": pd.array(split, dtype="string"),
            "carrier_id": pd.array(carrier.astype(int), dtype="Int64"),
            "days_since_order": days_since_order.astype("float64"),
            "is_handed_over": rng.random(n) < 0.5,
            "carrier": pd.array(carrier, dtype="string"),
            "region": pd.array(region, dtype="string"),
            "price_change_pct": price,
            "hours_since_last_scan": hours_quiet,
            "is_premium": is_premium,
            "noise": rng.normal(size=n),
        }
    )
    return SyntheticSet(
        frame=frame,
        true_probability=probability,
        feature_columns=[
            "carrier",
            "region",
            "price_change_pct",
            "hours_since_last_scan",
            "is_premium",
            "noise",
        ],
        categorical_columns=["carrier", "region"],
        static_columns=["carrier", "region", "is_premium"],
    )


@pytest.fixture(scope="session")
def synthetic_set() -> SyntheticSet:
    return make_synthetic_set()


@pytest.fixture(scope="session")
def empty_tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, its schema created once (the migrations take seconds)."""
    directory = tmp_path_factory.mktemp("tracking-template")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        MlflowClient(f"sqlite:///{directory / 'mlflow.db'}").search_experiments()
    return directory / "mlflow.db"


@pytest.fixture
def tracking_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_tracking_db: Path
) -> Iterator[str]:
    """A fresh SQLite tracking store for one test; artifacts land under ``tmp_path`` too.

    The working directory moves to ``tmp_path`` because MLflow puts the artifacts of a SQLite
    store under ``./mlruns``: nothing may be written into the repository.
    """
    shutil.copyfile(empty_tracking_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def simulated_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated shop's history directory, with the simulator's ``truth.csv``."""
    from simulator import SimulationConfig, simulate_shop, write_history

    out = tmp_path_factory.mktemp("history")
    world = simulate_shop(SimulationConfig(days=50, orders_per_day=30, seed=5), truth=True)
    write_history(world, out, posting_format="jsonl", truth=True)
    return out


@dataclass(frozen=True)
class TrainedShop:
    """A simulated shop's history, a model trained on it in memory, and its export moment."""

    history_dir: Path
    tables: object  # HistoryTables
    model: object  # RiskModel
    as_of: pd.Timestamp


@pytest.fixture(scope="session")
def trained_shop(tmp_path_factory: pytest.TempPathFactory) -> TrainedShop:
    """Big enough for the model to learn every cause the simulator plants (about a minute)."""
    from core.ingest import load_history
    from simulator import SimulationConfig, simulate_shop, write_history
    from training.config import load_training_config
    from training.dataset import build_training_set, fit_training_aggregates
    from training.train import fit_cancel_risk_model

    directory = tmp_path_factory.mktemp("trained-shop")
    write_history(simulate_shop(SimulationConfig(days=90, orders_per_day=150, seed=31)), directory)
    tables = load_history(directory)
    as_of = tables.latest_event_at()
    config = load_training_config(
        None, {"lightgbm": {"num_boost_round": 150, "early_stopping_rounds": 20}}
    )
    training_set = build_training_set(tables, as_of, config.snapshots)
    model = fit_cancel_risk_model(
        training_set, config, fit_training_aggregates(tables, as_of, config.snapshots)
    )
    return TrainedShop(directory, tables, model, as_of)


@pytest.fixture(scope="session")
def trained_model_dir(trained_shop: TrainedShop, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trained_shop``'s model saved as plain files (``RiskModel.save``), e.g. for ``--model``."""
    return trained_shop.model.save(tmp_path_factory.mktemp("trained-model") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir(simulated_history: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model (60 rounds) trained on ``simulated_history``, saved as plain files.

    Anything that takes a model directory (``--model DIR``) can use it; training takes seconds.
    """
    from core.ingest import load_history
    from training.config import load_training_config
    from training.dataset import build_training_set, fit_training_aggregates
    from training.train import fit_cancel_risk_model

    tables = load_history(simulated_history)
    as_of = tables.latest_event_at()
    # 50 days are too short for the default 40-day label window: 14 days keep 36 to learn from.
    config = load_training_config(
        None,
        {
            "lightgbm": {"num_boost_round": 60, "early_stopping_rounds": 10},
            "snapshots": {"label_window_days": 14},
        },
    )
    training_set = build_training_set(tables, as_of, config.snapshots)
    model = fit_cancel_risk_model(
        training_set, config, fit_training_aggregates(tables, as_of, config.snapshots)
    )
    return model.save(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of the session's own (``tests/postgres.py``): its superuser's URL,
    ``postgresql://USER@127.0.0.1:PORT/postgres``. A test wanting rows of its own takes
    ``postgres.create_database(postgres_url)``. Fails, never skips, when PostgreSQL is missing:
    ``make test`` installs it."""
    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        raise pytest.fail.Exception(str(error), pytrace=False) from None
    try:
        yield server.url
    finally:
        server.stop()
