"""The retraining notebook runs end to end under papermill and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest
from mlflow.tracking import MlflowClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "retrain.ipynb"


def test_committed_notebook_has_a_parameters_cell_and_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("history_dir", "as_of", "config_overrides", "tracking_uri"):
        assert f"{name} = " in tagged[0].source
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_retrain_notebook_trains_logs_and_shows_results(
    tmp_path: Path, simulated_history: Path, tracking_uri: str, fast_training: dict
) -> None:
    output = tmp_path / "retrain.out.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(output),
        parameters={
            "history_dir": str(simulated_history),
            "config_overrides": fast_training,
            "tracking_uri": tracking_uri,
            "promote_if_better": True,
        },
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    executed = nbformat.read(output, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "registered version: 1" in text
    tables = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "static_lightgbm" in tables
    assert "true_probability" in tables

    client = MlflowClient(tracking_uri)
    assert str(client.get_model_version_by_alias("cancel-risk", "champion").version) == "1"
