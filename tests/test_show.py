"""`cancel-risk show`: the riskiest orders of a score file, with reasons and actions."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from cancel_risk.cli import app


def _scores() -> pd.DataFrame:
    reason = {"code": "price_drop", "share": 0.6, "risk_drop": 0.3, "facts": "price -30 %"}
    return pd.DataFrame(
        {
            "posting_number": ["1-1-1", "2-2-2", "3-3-3"],
            "probability": [0.2, 0.9, 0.5],
            "risk_level": ["medium", "high", "high"],
            "reasons": ["[]", json.dumps([reason]), "[]"],
            "actions": ["[]", json.dumps(["Offer the buyer the difference as a coupon"]), "[]"],
            "decision": ["contact_buyer", "hold_and_confirm", "contact_buyer"],
        }
    )


def test_show_lists_the_riskiest_first_with_reasons_and_actions(tmp_path):
    path = tmp_path / "scores.parquet"
    _scores().to_parquet(path)
    result = CliRunner().invoke(app, ["show", "--scores", str(path), "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "The 2 riskiest of 3 open orders:"
    assert lines[1].startswith("1. 2-2-2  P(buyer cancels) 90%")
    assert "why: price -30 % (price_drop, 60%)" in result.output
    assert "do:  Offer the buyer the difference as a coupon" in result.output
    assert "1-1-1" not in result.output


def test_show_refuses_a_file_that_is_not_a_score_file(tmp_path):
    path = tmp_path / "other.csv"
    pd.DataFrame({"posting_number": ["1"]}).to_csv(path, index=False)
    result = CliRunner().invoke(app, ["show", "--scores", str(path)])
    assert result.exit_code == 2
    assert "not a score file: no column probability" in result.output
