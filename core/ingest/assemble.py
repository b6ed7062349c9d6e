"""Readers' fragments -> one ``HistoryTables``: merge duplicates, close postings, count.

The steps are pure and small: offset record sequences, merge duplicate postings (the most
progressed record wins, nulls filled from the others), resolve closing times from the events,
and fill the ``LoadReport`` so every record read is either kept, rejected or merged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd

from core.ingest.batches import (
    RECORD_SEQ,
    Parsed,
    PostingBatch,
    build_canonical,
    concat_frames,
    empty_items,
    empty_postings,
    empty_table,
)
from core.ingest.events import DELIVERED_STATES, PushBatch, empty_events
from core.ingest.postings import STATUS_PROGRESS
from core.tables import (
    ITEM_COLUMNS,
    POSTING_COLUMNS,
    PRODUCT_COLUMNS,
    REJECT_COLUMNS,
    TERMINAL_STATUSES,
    HistoryTables,
    LoadReport,
)

logger = logging.getLogger(__name__)


def build_sequenced(batches: Sequence[PostingBatch]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All posting and item rows with ``record_seq`` running across batches in reading order."""
    postings, items = [], []
    offset = 0
    for batch in batches:
        postings.append(batch.frame.assign(**{RECORD_SEQ: batch.frame[RECORD_SEQ] + offset}))
        items.append(batch.items.assign(**{RECORD_SEQ: batch.items[RECORD_SEQ] + offset}))
        offset += batch.records_read
    return concat_frames(postings, empty_postings()), concat_frames(items, empty_items())


def build_merged_postings(
    postings: pd.DataFrame, items: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per posting_number and the items of the winning records.

    Records are ranked by status progress, then by reading order; the last one wins and its
    null fields are filled from the others, latest first. Postings keep reading order (each
    at its first record's place), so data without duplicates is not copied at all.
    """
    duplicated = postings["posting_number"].duplicated(keep=False).to_numpy()
    if not duplicated.any():
        return postings, items
    multi = postings[duplicated]
    progress = multi["status"].map(STATUS_PROGRESS).fillna(0).to_numpy(dtype=np.int64)
    ranked = multi.iloc[np.lexsort((multi[RECORD_SEQ].to_numpy(), progress))]
    # GroupBy.last skips nulls: the winner's values, holes filled by the next-latest record.
    merged = ranked.groupby("posting_number", sort=False).last().reset_index()
    first_seq = multi.groupby("posting_number", sort=False)[RECORD_SEQ].min()
    place = first_seq.reindex(merged["posting_number"]).to_numpy()
    singles = postings[~duplicated]
    order = np.argsort(np.concatenate([singles[RECORD_SEQ].to_numpy(), place]), kind="stable")
    winners = pd.concat([singles, merged[postings.columns]], ignore_index=True)
    winners = winners.iloc[order].reset_index(drop=True)
    kept_items = items[items[RECORD_SEQ].isin(winners[RECORD_SEQ]).to_numpy()]
    return winners, kept_items.reset_index(drop=True)


# Examples of conflicting duplicates named in the warning; the count covers all of them.
CONFLICTS_SHOWN = 5


def build_status_conflict_warning(postings: pd.DataFrame) -> str | None:
    """A warning naming postings that have both a delivered and a cancelled record.

    Repeats of a posting normally show its progress, which the merge follows; two final
    statuses contradict each other, and the one read later is kept only because a choice must
    be made, so the seller is told which records disagree (file and line of each).
    """
    duplicated = postings["posting_number"].duplicated(keep=False).to_numpy()
    if not duplicated.any():
        return None
    final = postings[duplicated & postings["status"].isin(TERMINAL_STATUSES).to_numpy(bool)]
    kinds = final.groupby("posting_number", sort=False)["status"].nunique()
    conflicting = kinds.index[kinds.to_numpy() > 1]
    if not len(conflicting):
        return None
    examples = []
    for number in conflicting[:CONFLICTS_SHOWN]:
        records = final[final["posting_number"] == number].sort_values(RECORD_SEQ)
        where = ", ".join(
            f"{status} in {file} line {line}"
            for status, file, line in zip(
                records["status"], records["source_file"], records["source_line"], strict=True
            )
        )
        examples.append(f"{number} ({where})")
    more = len(conflicting) - len(examples)
    count = f"{len(conflicting)} postings have" if len(conflicting) > 1 else "1 posting has"
    return (
        f"{count} both a delivered and a cancelled record; the one read later is kept: "
        f"{'; '.join(examples)}" + (f"; and {more} more" if more else "")
    )


def build_closed_postings(postings: pd.DataFrame, events: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Resolve ``cancelled_at``/``delivered_at`` from the pushes and close stale snapshots.

    The push time wins over the cabinet's minute-precision date. A posting still open in its
    snapshot but cancelled or delivered by a later push takes that terminal status. Closing
    fields are kept consistent with the final status: a delivered posting has no canceller.
    Returns the postings and how many were closed by pushes.
    """
    cancellations = events[events["kind"].eq("cancellation").fillna(False)]
    first_cancel = cancellations.sort_values("at", kind="stable").drop_duplicates("posting_number")
    delivered = events[
        events["kind"].eq("state_change").fillna(False)
        & events["state"].isin(DELIVERED_STATES).fillna(False)
    ]
    first_delivery = delivered.groupby("posting_number")["at"].min()

    out = postings.copy()
    # Look the few postings with closing events up in the many, not the other way round.
    numbers = pd.Index(out["posting_number"])
    cancel_rows = numbers.get_indexer(first_cancel["posting_number"])
    delivery_rows = numbers.get_indexer(first_delivery.index)
    cancel_at = _scatter(first_cancel["at"], cancel_rows, len(out))
    deliver_at = _scatter(first_delivery, delivery_rows, len(out))
    open_ = ~out["status"].isin(TERMINAL_STATUSES).fillna(False).to_numpy()
    cancel_first = cancel_at.notna() & (deliver_at.isna() | (cancel_at <= deliver_at))
    closes_by_cancel = open_ & cancel_first.to_numpy()
    closes_by_delivery = open_ & deliver_at.notna().to_numpy() & ~closes_by_cancel
    out.loc[closes_by_cancel, "status"] = "cancelled"
    out.loc[closes_by_delivery, "status"] = "delivered"

    is_cancelled = out["status"].eq("cancelled").fillna(False).to_numpy()
    is_delivered = out["status"].eq("delivered").fillna(False).to_numpy()
    out["cancelled_by"] = out["cancelled_by"].where(~is_delivered)
    out.loc[is_cancelled & out["cancelled_by"].isna().to_numpy(), "cancelled_by"] = "unknown"
    push_reason_id = _scatter(first_cancel["reason_id"], cancel_rows, len(out))
    push_reason = _scatter(first_cancel["reason"], cancel_rows, len(out))
    out["cancel_reason_id"] = out["cancel_reason_id"].fillna(push_reason_id.where(is_cancelled))
    out["cancel_reason"] = out["cancel_reason"].fillna(push_reason.where(is_cancelled))
    out["cancelled_at"] = cancel_at.fillna(out["cancelled_at"]).where(is_cancelled)
    out["delivered_at"] = deliver_at.fillna(out["delivered_at"]).where(is_delivered)
    return out, int(closes_by_cancel.sum() + closes_by_delivery.sum())


def _scatter(values: pd.Series, rows: np.ndarray, n: int) -> pd.Series:
    """``values`` placed at ``rows`` of an all-missing column of length ``n`` (-1 = nowhere)."""
    out = pd.Series(pd.NA, index=pd.RangeIndex(n), dtype=values.dtype)
    found = rows >= 0
    out.iloc[rows[found]] = values.array[found]
    return out


def build_latest_products(products: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One card per offer_id, the one read last; and how many older cards were folded in."""
    latest = products.drop_duplicates("offer_id", keep="last").reset_index(drop=True)
    return latest, len(products) - len(latest)


def build_push_warnings(batches: Sequence[Parsed]) -> list[str]:
    """Warnings for pushes skipped on purpose: unused types and failed card updates."""
    skipped: Counter[str] = Counter()
    failed = 0
    for batch in batches:
        if isinstance(batch, PushBatch):
            skipped.update(batch.skipped_types)
            failed += batch.failed_item_updates
    warnings = []
    if skipped:
        kinds = ", ".join(f"{name} ({count})" for name, count in sorted(skipped.items()))
        warnings.append(f"skipped {skipped.total()} pushes of unused types: {kinds}")
    if failed:
        warnings.append(
            f"skipped {failed} TYPE_CREATE_OR_UPDATE_ITEM pushes with is_error=true "
            "(the card was not changed)"
        )
    return warnings


def _unreadable_date_warnings(batches: Sequence[Parsed]) -> list[str]:
    per_source: Counter[str] = Counter()
    for batch in batches:
        per_source[batch.source] += batch.unreadable_dates
    return [
        f"{source}: {count} optional timestamps could not be read and were left empty"
        for source, count in per_source.items()
        if count
    ]


def build_history_tables(
    posting_batches: Sequence[PostingBatch],
    event_batches: Sequence[Parsed] = (),
    product_batches: Sequence[Parsed] = (),
    *,
    missing_optional: Sequence[str] = (),
    warnings: Sequence[str] = (),
) -> HistoryTables:
    """Assemble the normalised tables and the load report from all readers' fragments."""
    postings, items = build_sequenced(posting_batches)
    conflict_warning = build_status_conflict_warning(postings)
    merged, kept_items = build_merged_postings(postings, items)
    events = concat_frames([b.frame for b in event_batches], empty_events())
    if not events["at"].is_monotonic_increasing:
        events = events.sort_values("at", kind="stable", ignore_index=True)
    closed, n_closed = build_closed_postings(merged, events)
    products = concat_frames([b.frame for b in product_batches], empty_table(PRODUCT_COLUMNS))
    products, n_folded_cards = build_latest_products(products)

    all_batches = [*posting_batches, *event_batches, *product_batches]
    files_read: dict[str, int] = {}
    for batch in all_batches:
        files_read[batch.source] = files_read.get(batch.source, 0) + batch.records_read
    report_warnings = [
        *warnings,
        *([conflict_warning] if conflict_warning else []),
        *build_push_warnings(event_batches),
        *_unreadable_date_warnings(all_batches),
    ]
    if n_closed:
        report_warnings.append(
            f"{n_closed} postings were still open in their snapshot and closed by a later push"
        )
    if n_folded_cards:
        report_warnings.append(f"merged {n_folded_cards} older product cards of the same offer_id")

    rejected = sum(len(b.rejects) for b in posting_batches)
    report = LoadReport(
        postings_read=sum(b.records_read for b in posting_batches),
        postings_kept=len(closed),
        postings_rejected=rejected,
        duplicates_merged=len(postings) - len(closed),
        files_read=files_read,
        missing_optional=list(missing_optional),
        warnings=report_warnings,
    )
    rejects = concat_frames([b.rejects for b in all_batches], empty_table(REJECT_COLUMNS))
    if len(rejects):
        logger.warning("%d records rejected; see the rejects report", len(rejects))
    return HistoryTables(
        postings=build_canonical(closed, POSTING_COLUMNS),
        items=build_canonical(kept_items, ITEM_COLUMNS),
        events=events,
        products=build_canonical(products, PRODUCT_COLUMNS),
        rejects=build_canonical(rejects, REJECT_COLUMNS),
        report=report,
    )
