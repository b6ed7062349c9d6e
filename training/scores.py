"""Reading a `cancel-risk score` output back, and showing its riskiest orders to a person."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from core.playbook import percent_text

REQUIRED = ("posting_number", "probability", "risk_level", "reasons", "actions", "decision")


def load_scores(path: str | Path) -> pd.DataFrame:
    """A score file (Parquet or CSV by its extension), checked for the columns shown."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        frame = pd.read_csv(path, dtype={"posting_number": str})
    elif path.suffix.lower() in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise ValueError(f"{path}: a score file ends in .parquet or .csv")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is not a score file: no column {', '.join(missing)}")
    return frame


def format_riskiest(frame: pd.DataFrame, top: int) -> str:
    """The ``top`` orders by probability, each with its reasons and actions, as text."""
    riskiest = frame.sort_values(
        ["probability", "posting_number"], ascending=[False, True], kind="stable"
    ).head(top)
    lines = [f"The {len(riskiest)} riskiest of {len(frame):,} open orders:"]
    for rank, row in enumerate(riskiest.itertuples(index=False), start=1):
        shown = percent_text(row.probability, space="")
        lines.append(
            f"{rank}. {row.posting_number}  P(buyer cancels) {shown}  "
            f"{row.risk_level}  -> {row.decision}"
        )
        for reason in json.loads(row.reasons):
            lines.append(f"     why: {reason['facts']} ({reason['code']}, {reason['share']:.0%})")
        for action in json.loads(row.actions):
            lines.append(f"     do:  {action}")
    return "\n".join(lines)
