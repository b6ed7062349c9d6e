"""The cause analysis: where buyer cancellations come from, and which open orders need action.

:func:`build_cause_analysis` computes everything (the report, the notebook and tests call it);
:func:`render_report_html` turns it into one self-contained HTML page (charts as inline SVG,
no external files), which :func:`write_report` writes.

Cancellation rates are measured over the daily moments of resolved postings: "of the orders seen
in this state, this share was later cancelled by the buyer" — the same moments and labels the
model learns from, so a state that lasts (late, quiet) counts each day it lasted.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from core.counterfactuals import CAUSES, build_risk_drops
from core.explain import build_explanations, model_costs
from core.features import build_feature_rows, build_features
from core.playbook import load_playbook
from core.tables import HistoryTables
from training.dataset import SnapshotConfig, build_scoring_moments, known_at
from training.labels import build_labels

if TYPE_CHECKING:
    from core.model import RiskModel
    from core.playbook import Playbook

logger = logging.getLogger(__name__)

TOP_OPEN_ORDERS = 100


@dataclass
class CauseAnalysis:
    as_of: pd.Timestamp
    lang: str
    rates: dict[str, pd.DataFrame]  # dimension -> bucket, moments, postings, buyer_cancel_rate
    open_orders: pd.DataFrame  # open at as_of, ranked by expected loss
    risk_by_cause: pd.DataFrame  # cause, title, risk_share, orders
    moments: int
    labelled_postings: int


def _bucket(values: pd.Series, edges: list[float], labels: list[str], missing: str) -> pd.Series:
    binned = pd.cut(values.astype("float64"), bins=edges, labels=labels, right=False)
    return binned.astype("string").fillna(missing)


def _dimensions(features: pd.DataFrame, carrier_names: pd.Series) -> dict[str, pd.Series]:
    inf = np.inf
    quiet = _bucket(
        features["hours_since_last_activity"],
        [-inf, 24, 72, 168, inf],
        ["under 1 day", "1–3 days", "3–7 days", "over 7 days"],
        "unknown",
    )
    handed = features["is_handed_over"].astype("float64") > 0.5
    carrier = features["carrier"].astype("string")
    return {
        "carrier": carrier.map(lambda c: f"{carrier_names.get(c, '?')} ({c})" if pd.notna(c) else c)
        .astype("string")
        .fillna("unknown"),
        "price change since purchase": _bucket(
            features["price_change_pct"],
            [-inf, -15, -5, -0.5, inf],
            [
                "cheaper by over 15 %",
                "cheaper by 5–15 %",
                "cheaper by 0.5–5 %",
                "unchanged or higher",
            ],
            "no price log",
        ),
        "lateness": _bucket(
            features["hours_to_promised_delivery_end"],
            [-inf, -72, 0, 72, inf],
            ["late over 3 days", "late up to 3 days", "due within 3 days", "over 3 days left"],
            "no promise",
        ),
        "tracking silence (handed over)": quiet.where(handed, "not handed over"),
        "card edits since purchase": _bucket(
            features["card_edits_since_purchase"],
            [-inf, 1, 2, inf],
            ["none", "1", "2 or more"],
            "unknown",
        ),
        "region": features["region"].astype("string").fillna("unknown"),
        "payment type": features["payment_type"].astype("string").fillna("unknown"),
    }


def build_cancellation_rates(
    tables: HistoryTables, as_of: pd.Timestamp, *, every_hours: float = 48.0
) -> tuple[dict[str, pd.DataFrame], int, int]:
    """Buyer-cancellation rate by each dimension over labelled moments known at ``as_of``."""
    known = known_at(tables, as_of)
    config = SnapshotConfig(
        every_hours=every_hours, label_window_days=0, max_moments_per_posting=None
    )
    moments = build_scoring_moments(known, as_of, config)
    labels = build_labels(known, moments)
    keep = labels.notna().to_numpy()
    moments, labels = moments[keep].reset_index(drop=True), labels[keep].astype("float64")
    features = build_feature_rows(known, moments)
    carrier_names = (
        known.postings.dropna(subset=["carrier_id"])
        .assign(carrier=lambda f: f["carrier_id"].astype("string"))
        .drop_duplicates("carrier")
        .set_index("carrier")["carrier_name"]
    )
    rates = {}
    for name, bucket in _dimensions(features, carrier_names).items():
        frame = pd.DataFrame(
            {
                "bucket": bucket.to_numpy(),
                "label": labels.to_numpy(),
                "posting": moments["posting_number"],
            }
        )
        table = frame.groupby("bucket", sort=False).agg(
            moments=("label", "size"),
            postings=("posting", "nunique"),
            buyer_cancel_rate=("label", "mean"),
        )
        rates[name] = table.sort_values("buyer_cancel_rate", ascending=False).reset_index()
    return rates, len(moments), int(moments["posting_number"].nunique())


def build_open_order_table(
    tables: HistoryTables,
    as_of: pd.Timestamp,
    model: RiskModel,
    *,
    lang: str = "en",
    playbook: Playbook | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Open orders at ``as_of`` ranked by expected loss, and the share of risk per cause."""
    playbook = playbook or load_playbook()
    costs = model_costs(model)
    features = build_features(tables, as_of, aggregates=model.aggregates)
    probabilities = model.score_features(features)
    explanations = build_explanations(
        model, features, probabilities, lang=lang, playbook=playbook, costs=costs
    )
    orders = pd.DataFrame(
        {
            "posting_number": features.index.astype("string"),
            "probability": probabilities,
            "risk_level": model.risk_levels(probabilities),
            "expected_loss": probabilities * costs.cancelled_order_cost,
            "decision": [e.decision for e in explanations],
            "expected_saving": [e.expected_saving for e in explanations],
            "reasons": [
                "; ".join(f"{r.code}: {r.facts} ({r.share:.0%})" for r in e.reasons)
                for e in explanations
            ],
            "actions": ["; ".join(e.actions) for e in explanations],
        }
    ).sort_values(["expected_loss", "posting_number"], ascending=[False, True], ignore_index=True)
    drops = build_risk_drops(model, features, probabilities).clip(lower=0)
    total = float(np.sum(probabilities)) or 1.0
    by_cause = pd.DataFrame(
        {
            "cause": list(CAUSES),
            "title": [playbook.causes[c].title.get(lang) for c in CAUSES],
            "risk_share": [float(drops[c].sum()) / total for c in CAUSES],
            "orders": [int((drops[c] > 0).sum()) for c in CAUSES],
        }
    ).sort_values("risk_share", ascending=False, ignore_index=True)
    return orders, by_cause


def build_cause_analysis(
    tables: HistoryTables,
    as_of: pd.Timestamp,
    model: RiskModel,
    *,
    lang: str = "en",
    playbook: Playbook | None = None,
) -> CauseAnalysis:
    """Everything the report shows, computed from the history known at ``as_of``."""
    rates, moments, postings = build_cancellation_rates(tables, as_of)
    orders, by_cause = build_open_order_table(tables, as_of, model, lang=lang, playbook=playbook)
    return CauseAnalysis(as_of, lang, rates, orders, by_cause, moments, postings)


# --- rendering ---------------------------------------------------------------------------------


def _text_width(text: str) -> float:
    """About how wide ``text`` is at the charts' 13 px: wide (CJK) characters count double."""
    return sum(13.0 if ord(c) >= 0x2E80 else 7.2 for c in text)


def bar_chart_svg(labels: list[str], values: list[float], counts: list[int], title: str) -> str:
    """A horizontal bar chart as inline SVG: the browser draws the text, in any script. It
    scales down to narrow screens (``viewBox``); the report and the dashboard draw it."""
    row, bar_width, pad = 26, 420, 8
    label_width = min(max((_text_width(label) for label in labels), default=0) + 2 * pad, 460)
    label_width = max(label_width, 160)
    top = 30
    height = top + row * len(labels) + pad
    full_width = label_width + bar_width + 160
    scale = bar_width / max(max(values, default=0.0), 1e-9)
    parts = [
        f'<svg class="chart" role="img" width="{full_width}" height="{height}" '
        f'viewBox="0 0 {full_width} {height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{html.escape(title)}</title>",
        f'<text x="0" y="18" class="chart-title">{html.escape(title)}</text>',
    ]
    for i, (label, value, n) in enumerate(zip(labels, values, counts, strict=True)):
        y = top + i * row
        width = max(value * scale, 1.0)
        parts.append(
            f'<text x="{label_width - pad}" y="{y + 17}" text-anchor="end">'
            f"{html.escape(label)}</text>"
            f'<rect x="{label_width}" y="{y + 4}" width="{width:.1f}" height="{row - 8}" rx="2"/>'
            f'<text x="{label_width + width + pad:.1f}" y="{y + 17}">{value:.1%} '
            f'<tspan class="count">(n={n:,})</tspan></text>'
        )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } .num { text-align: right; white-space: nowrap; }
.high { color: #b03a2e; font-weight: bold; } .medium { color: #b9770e; }
.chart { display: block; margin: 0.5rem 0 1.5rem; max-width: 100%; font-size: 13px; }
.chart rect { fill: #c0392b; } .chart .count { fill: #777; }
.chart-title { font-weight: bold; font-size: 14px; }
.note { color: #666; font-size: 0.85rem; }
"""

# Marks the page once laid out: how many charts have bars drawn, and any script error.
_LOAD_CHECK = """
window.addEventListener("error", () => { document.body.dataset.errors = "1"; });
window.addEventListener("load", () => {
  const drawn = [...document.querySelectorAll("svg.chart")].filter(
    (svg) => svg.getBoundingClientRect().width > 0 && svg.querySelector("rect")
  ).length;
  document.body.dataset.chartsDrawn = String(drawn);
});
"""


def render_report_html(analysis: CauseAnalysis) -> str:
    """The analysis as one self-contained HTML page."""
    as_of = analysis.as_of.strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Cancellation causes — {as_of}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Why buyers cancel — as of {as_of}</h1>",
        f'<p class="note">{analysis.moments:,} daily moments of {analysis.labelled_postings:,} '
        "resolved orders: each bar is the share of orders seen in that state that the buyer "
        "later cancelled.</p>",
    ]
    by_cause = analysis.risk_by_cause
    parts.append("<h2>Today's risk by cause</h2>")
    parts.append(
        bar_chart_svg(
            by_cause["title"].tolist(),
            by_cause["risk_share"].tolist(),
            by_cause["orders"].tolist(),
            "Share of the open orders' total risk that fixing each cause would remove",
        )
    )
    parts.append("<h2>Buyer-cancellation rates</h2>")
    for name, table in analysis.rates.items():
        parts.append(
            bar_chart_svg(
                table["bucket"].astype(str).tolist(),
                table["buyer_cancel_rate"].tolist(),
                table["postings"].tolist(),
                f"By {name}",
            )
        )
    orders = analysis.open_orders
    shown = orders.head(TOP_OPEN_ORDERS)
    parts.append(f"<h2>Open orders by expected loss ({len(shown)} of {len(orders):,})</h2>")
    parts.append(
        "<table><tr><th>Posting</th><th>Risk</th><th class=num>P(cancel)</th>"
        "<th class=num>Expected loss</th><th>Decision</th><th>Reasons</th><th>Actions</th></tr>"
    )
    for row in shown.itertuples():
        parts.append(
            f"<tr><td>{html.escape(row.posting_number)}</td>"
            f'<td class="{row.risk_level}">{row.risk_level}</td>'
            f"<td class=num>{row.probability:.1%}</td><td class=num>{row.expected_loss:,.0f}</td>"
            f"<td>{html.escape(row.decision)}</td><td>{html.escape(row.reasons)}</td>"
            f"<td>{html.escape(row.actions)}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<script>{_LOAD_CHECK}</script></body></html>")
    return "\n".join(parts)


def write_report(analysis: CauseAnalysis, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_report_html(analysis), encoding="utf-8")
    tmp.replace(path)
    return path
