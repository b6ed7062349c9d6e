"""What a loaded history holds: a JSON-ready summary and its terminal rendering.

``summarize`` is pure and serialisable so scripts (``cancel-risk inspect --json``) and people
read the same numbers; ``format_summary`` only lays them out.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from core.tables import EVENT_KINDS, TERMINAL_STATUSES, HistoryTables

# Rejects printed in the text report; the JSON summary always carries all of them.
REJECTS_SHOWN = 20


def _iso(value: Any) -> str | None:
    """An ISO-8601 UTC string for a timestamp, or None when there is none."""
    if value is None or pd.isna(value):
        return None
    return pd.Timestamp(value).isoformat()


def _counts(values: pd.Series) -> dict[str, int]:
    """Value counts as a plain dict, most frequent first, missing values left out."""
    counts = values.dropna().value_counts(sort=True)
    return {str(key): int(count) for key, count in counts.items()}


def _rejects(tables: HistoryTables) -> list[dict[str, Any]]:
    frame = tables.rejects
    lines = frame["line"].astype("object").where(frame["line"].notna(), None)
    return [
        {"file": str(file), "line": None if line is None else int(line), "reason": str(reason)}
        for file, line, reason in zip(frame["file"], lines, frame["reason"], strict=True)
    ]


def summarize(tables: HistoryTables) -> dict[str, Any]:
    """Counts that show what a load read, kept and rejected, and what the history holds.

    Every value is a plain JSON type. Cancellations are split by who cancelled: only buyer
    cancellations are what the model predicts; the others are listed by ``cancelled_by``.
    """
    postings = tables.postings
    report = tables.report
    cancelled_by = postings["cancelled_by"]
    is_buyer = cancelled_by.eq("buyer").fillna(False)
    events = tables.events
    event_counts = _counts(events["kind"])
    open_postings = ~postings["status"].isin(TERMINAL_STATUSES).fillna(False)
    return {
        "postings_read": report.postings_read,
        "postings_kept": report.postings_kept,
        "postings_rejected": report.postings_rejected,
        "duplicates_merged": report.duplicates_merged,
        "postings_by_status": _counts(postings["status"]),
        "open_postings": int(open_postings.sum()),
        "buyer_cancellations": int(is_buyer.sum()),
        "other_cancellations": _counts(cancelled_by[~is_buyer]),
        "date_range": {
            "first_order_at": _iso(postings["ordered_at"].min()),
            "last_order_at": _iso(postings["ordered_at"].max()),
            "latest_event_at": _iso(tables.latest_event_at()),
        },
        "items": len(tables.items),
        "products": len(tables.products),
        "events_by_kind": {kind: event_counts.get(kind, 0) for kind in EVENT_KINDS},
        "files": dict(report.files_read),
        "missing_optional": list(report.missing_optional),
        "warnings": list(report.warnings),
        "rejects": _rejects(tables),
    }


def _table(rows: list[tuple[str, Any]], indent: str = "  ") -> list[str]:
    if not rows:
        return [f"{indent}(none)"]
    width = max(len(name) for name, _ in rows)
    return [f"{indent}{name.ljust(width)}  {value}" for name, value in rows]


def format_summary(summary: dict[str, Any]) -> str:
    """A compact text report of ``summarize``'s result for a terminal."""
    dates = summary["date_range"]
    lines = [
        f"postings: {summary['postings_read']} read, {summary['postings_kept']} kept, "
        f"{summary['postings_rejected']} rejected, "
        f"{summary['duplicates_merged']} duplicates merged",
        f"orders from {dates['first_order_at'] or '-'} to {dates['last_order_at'] or '-'}; "
        f"latest event {dates['latest_event_at'] or '-'}",
        f"open postings: {summary['open_postings']}",
        "",
        "by status:",
        *_table(list(summary["postings_by_status"].items())),
        "",
        f"buyer cancellations: {summary['buyer_cancellations']}",
        "other cancellations (not buyer, not learned as buyer behaviour):",
        *_table(list(summary["other_cancellations"].items())),
        "",
        "events by kind:",
        *_table(list(summary["events_by_kind"].items())),
        "",
        "records read per file:",
        *_table(list(summary["files"].items())),
    ]
    if summary["missing_optional"]:
        lines += ["", "missing optional files: " + ", ".join(summary["missing_optional"])]
    if summary["warnings"]:
        lines += ["", "warnings:", *(f"  - {w}" for w in summary["warnings"])]
    rejects = summary["rejects"]
    lines += ["", f"rejects: {len(rejects)}"]
    shown = [
        (r["file"] if r["line"] is None else f"{r['file']}:{r['line']}", r["reason"])
        for r in rejects[:REJECTS_SHOWN]
    ]
    lines += _table(shown) if shown else []
    if len(rejects) > REJECTS_SHOWN:
        lines.append(f"  ... and {len(rejects) - REJECTS_SHOWN} more (see --json)")
    return "\n".join(lines)
