"""`cancel-risk score --engine spark`: many shops in Spark local mode, the single-machine scores."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("pyspark")

from batch import build_output_paths, load_scoring_model, run_batch
from batch.spark import (
    REJECTS_DIR,
    SUMMARY_FILE,
    build_spark_session,
    run_spark_batch,
)
from cancel_risk.cli import app

GOOD_SHOPS = ("east", "north", "south", "west")
# Fast start-up on one machine: no UI, the loopback interface, few shuffle partitions.
TEST_SESSION = {
    "spark.ui.enabled": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.sql.shuffle.partitions": "2",
}

pytestmark = [
    pytest.mark.slow,
    # PySpark 4.3 warns about pandas 3 on every session; the job hands Spark Arrow, not pandas.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]


@pytest.fixture(scope="module")
def spark():
    session = build_spark_session("local[2]", TEST_SESSION)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def shops_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny simulated shops, one whose postings are mostly broken, one with no postings."""
    from simulator import SimulationConfig, simulate_shop, write_history

    root = tmp_path_factory.mktemp("shops")
    for seed, name in enumerate(GOOD_SHOPS, start=40):
        write_history(
            simulate_shop(SimulationConfig(days=12, orders_per_day=10, seed=seed)), root / name
        )
    broken = write_history(
        simulate_shop(SimulationConfig(days=5, orders_per_day=4, seed=50)), root / "broken"
    )[0]
    with broken.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n" * 100)
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()  # not a shop
    return root


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_scoring_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def spark_run(spark, shops_root: Path, model, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("spark-out") / "scores"
    return out, run_spark_batch(shops_root, out, model=model, spark=spark)


def test_each_shop_gets_exactly_the_single_machine_scores(
    spark_run, shops_root: Path, model, tmp_path: Path
) -> None:
    out, result = spark_run
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    for shop in GOOD_SHOPS:
        single = run_batch(shops_root / shop, tmp_path / f"{shop}.parquet", model=model)
        expected = pd.read_parquet(single.paths.scores)
        got = pd.read_parquet(out / f"shop={shop}")
        assert len(got) > 0
        pd.testing.assert_frame_equal(got, expected, check_exact=True)

        single_summary = dict(single.summary)
        single_summary.pop("outputs")
        assert summary["shops"][shop] == single_summary == result.summaries[shop]

        expected_rejects = pd.read_csv(build_output_paths(single.paths.scores).rejects)
        partition = out / REJECTS_DIR / f"shop={shop}"
        rejects = pd.read_parquet(partition) if partition.exists() else expected_rejects[:0]
        assert rejects["file"].tolist() == expected_rejects["file"].tolist()
        assert rejects["line"].tolist() == expected_rejects["line"].tolist()
        assert rejects["reason"].tolist() == expected_rejects["reason"].tolist()


def test_unusable_shops_are_reported_and_get_no_scores(spark_run) -> None:
    out, result = spark_run
    assert set(result.failed_shops) == {"broken", "empty"}
    assert "posting records were rejected" in result.failed_shops["broken"]
    assert "no postings" in result.failed_shops["empty"]
    partitions = sorted(p.name for p in out.iterdir() if p.name.startswith("shop="))
    assert partitions == [f"shop={shop}" for shop in GOOD_SHOPS]
    broken_rejects = pd.read_parquet(out / REJECTS_DIR / "shop=broken")
    assert (broken_rejects["reason"].str.startswith("not valid JSON")).sum() == 100
    assert "2 shops were not scored" in result.failure_message()


def test_the_output_appears_complete_with_no_staging_left(spark_run) -> None:
    out, _ = spark_run
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert (out / "_SUCCESS").exists()


def test_the_cli_replaces_the_dataset_and_exits_non_zero_for_failed_shops(
    spark, shops_root: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "north").symlink_to(shops_root / "north", target_is_directory=True)
    (root / "empty").mkdir()
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "stale.parquet").write_bytes(b"an earlier run")
    args = ["score", "--engine", "spark", "--history", str(root), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir)])
    assert result.exit_code == 2
    assert "1 shops were not scored (empty:" in result.stderr
    assert "north: ok" in result.stdout
    assert not (out / "stale.parquet").exists()
    assert len(pd.read_parquet(out / "shop=north")) > 0


def test_an_executor_loads_the_shipped_model_once_for_all_its_shops(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyspark

    from batch import ScoringOptions
    from batch import spark as spark_job
    from core.model import RiskModel

    loads = []
    load = RiskModel.load
    monkeypatch.setattr(pyspark.SparkFiles, "get", lambda name: str(tiny_model_dir))
    monkeypatch.setattr(
        RiskModel, "load", classmethod(lambda cls, path: loads.append(path) or load(path))
    )
    monkeypatch.setattr(spark_job, "_EXECUTOR_MODELS", {})
    task = spark_job.ShopTask("model-1", "cancel-risk", "3", "uri", None, ScoringOptions(), 0.05)
    first = spark_job._executor_model(task)
    assert spark_job._executor_model(task) is first
    assert loads == [str(tiny_model_dir)]
    assert (first.name, first.version) == ("cancel-risk", "3")
