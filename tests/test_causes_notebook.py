"""The cause-analysis notebook runs under papermill on a simulated shop and shows its tables."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cancellation_causes.ipynb"


def test_committed_notebook_has_parameters_and_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.outputs for c in notebook.cells if c.cell_type == "code")


def test_cause_notebook_shows_the_analysis(trained_shop, tmp_path: Path) -> None:
    model_dir = trained_shop.model.save(tmp_path / "model")
    output = tmp_path / "causes.out.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(output),
        parameters={"history_dir": str(trained_shop.history_dir), "model_uri": str(model_dir)},
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    executed = nbformat.read(output, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "risk_share" in html
    assert "By tracking silence (handed over)" in html
    assert html.count('<svg class="chart"') == 8
