"""Records given as Python objects (a REST request) -> the normalised tables.

The REST service receives a posting exactly as the Seller API returns it, plus its own
pushes, price rows, scans and cards as objects. They go through the same builders as the
files, so a posting scored online is parsed exactly as it was in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from core.ingest.assemble import build_history_tables
from core.ingest.batches import Parsed, concat_frames
from core.ingest.events import (
    PRICE_COLUMNS,
    SCAN_COLUMNS,
    build_price_events,
    build_push_events,
    build_row_columns,
    build_scan_events,
)
from core.ingest.postings import build_api_posting_batch
from core.ingest.products import build_products
from core.tables import HistoryTables


def _numbered(records: Iterable[Any]) -> tuple[list[Any], list[int]]:
    listed = list(records)
    return listed, list(range(1, len(listed) + 1))


def _rows_to_events(
    rows: list[Any],
    names: tuple[str, ...],
    source: str,
    what: str,
    builder: Callable[..., Parsed],
) -> Parsed:
    """Price or scan rows given as dicts with the CSV's column names -> events."""
    columns, lines, shape_rejects = build_row_columns(rows, names, source, what)
    parsed = builder(columns, lines, source)
    parsed.rejects = concat_frames([shape_rejects, parsed.rejects], parsed.rejects)
    parsed.rejects = parsed.rejects.sort_values("line", kind="stable", ignore_index=True)
    parsed.records_read = len(rows)
    return parsed


def _relabel(parsed: Parsed, label: str) -> Parsed:
    parsed.source = label
    return parsed


def tables_from_objects(
    postings: Iterable[dict[str, Any]],
    pushes: Iterable[dict[str, Any]] = (),
    prices: Iterable[dict[str, Any]] = (),
    tracking: Iterable[dict[str, Any]] = (),
    products: Iterable[dict[str, Any]] = (),
    *,
    source: str = "request",
) -> HistoryTables:
    """Parse postings, pushes, price rows, scan rows and product cards given as objects.

    Never raises on bad records: each goes to ``rejects`` with ``file = source``, ``line`` =
    its 1-based index in its own list, and a reason naming what it was ("TYPE_STATE_CHANGED
    push: ...", "price row: ...", "scan row: ...", "product card: ..."; postings unprefixed).
    The report counts records per part as ``source`` (postings) and ``source:pushes`` etc.
    """
    posting_records, posting_lines = _numbered(postings)
    push_records, push_lines = _numbered(pushes)
    price_rows, scan_rows = list(prices), list(tracking)
    card_records, card_lines = _numbered(products)
    # Parts that are absent are not parsed at all: a request usually carries few of them.
    events: list[Parsed] = []
    if push_records:
        events.append(
            _relabel(build_push_events(push_records, push_lines, source), f"{source}:pushes")
        )
    if price_rows:
        parsed = _rows_to_events(price_rows, PRICE_COLUMNS, source, "price row", build_price_events)
        events.append(_relabel(parsed, f"{source}:prices"))
    if scan_rows:
        parsed = _rows_to_events(scan_rows, SCAN_COLUMNS, source, "scan row", build_scan_events)
        events.append(_relabel(parsed, f"{source}:tracking"))
    cards = (
        [_relabel(build_products(card_records, card_lines, source), f"{source}:products")]
        if card_records
        else []
    )
    return build_history_tables(
        [build_api_posting_batch(posting_records, posting_lines, source)], events, cards
    )
