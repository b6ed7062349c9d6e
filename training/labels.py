"""Labels: did the buyer cancel a posting that was open at a moment ``as_of``?

Kept apart from the feature code on purpose: labels read the future of a moment (how the
posting ended), features never may. For a moment (posting, ``as_of``) with the posting open at
``as_of``:

- 1 when the buyer cancels it after ``as_of``;
- 0 when it is delivered after ``as_of``;
- no label when someone else (seller, Ozon, system, carrier) or an unknown initiator cancels it:
  a different problem, never learned as buyer behaviour;
- no label (censored) when it is still open at the end of the data: it is not a negative, it
  just has not ended yet.

"The end of the data" is whatever the tables hold; a training set cuts them to what was known at
its ``as_of`` first (``training.dataset.known_at``), so labels too use only what was known then.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.aggregates import (
    BUYER_CANCELLED,
    DELIVERED,
    OTHER_CANCELLED,
    UNKNOWN_CANCELLED,
    build_resolutions,
)
from core.point_in_time import NAT_NS, gather, to_ns
from core.tables import HistoryTables

# Why a moment has no label, in the order the checks apply.
UNKNOWN_POSTING = "unknown_posting"
NOT_ORDERED_YET = "not_ordered_yet"
CLOSING_TIME_UNKNOWN = "closing_time_unknown"
CLOSED_BEFORE = "closed_at_or_before_as_of"
CANCELLED_NOT_BY_BUYER = "cancelled_not_by_buyer"
CANCELLED_BY_UNKNOWN = "cancelled_by_unknown"
CENSORED = "censored"
EXCLUSION_REASONS = (
    UNKNOWN_POSTING,
    NOT_ORDERED_YET,
    CLOSING_TIME_UNKNOWN,
    CLOSED_BEFORE,
    CANCELLED_NOT_BY_BUYER,
    CANCELLED_BY_UNKNOWN,
    CENSORED,
)


def build_label_frame(tables: HistoryTables, moments: pd.DataFrame) -> pd.DataFrame:
    """Label and exclusion reason of each moment (``posting_number``, ``as_of``).

    Returns ``label`` (Int8: 1, 0 or NA) and ``exclusion_reason`` (string, NA when labelled),
    indexed like ``moments``.
    """
    postings = tables.postings
    resolutions = build_resolutions(postings)
    row = (
        pd.Index(postings["posting_number"].astype("string"))
        .get_indexer(moments["posting_number"].astype("string"))
        .astype("int64")
    )
    as_of_ns = to_ns(pd.to_datetime(moments["as_of"], utc=True))
    ordered_ns = gather(to_ns(postings["ordered_at"]), row, NAT_NS)
    closed_ns = gather(to_ns(resolutions["closed_at"]), row, NAT_NS)
    unplaceable = gather(resolutions["closing_time_unknown"].to_numpy(), row, False).astype(bool)
    outcome = pd.Series(resolutions["outcome"].array.take(row, allow_fill=True))
    outcome = outcome.fillna("").to_numpy(dtype=object)

    known = row >= 0
    conditions = [
        ~known,
        (ordered_ns == NAT_NS) | (ordered_ns > as_of_ns),
        unplaceable,
        (closed_ns != NAT_NS) & (closed_ns <= as_of_ns),
        outcome == OTHER_CANCELLED,
        outcome == UNKNOWN_CANCELLED,
        closed_ns == NAT_NS,
    ]
    reason = np.select(conditions, list(EXCLUSION_REASONS), default="")
    labelled = reason == ""
    label = np.where(outcome == BUYER_CANCELLED, 1, np.where(outcome == DELIVERED, 0, -1))
    return pd.DataFrame(
        {
            "label": pd.array(np.where(labelled, label, None), dtype="Int8"),
            "exclusion_reason": pd.array(np.where(labelled, None, reason), dtype="string"),
        },
        index=moments.index,
    )


def build_labels(tables: HistoryTables, moments: pd.DataFrame) -> pd.Series:
    """Per moment: 1 (buyer cancels after ``as_of``), 0 (delivered after) or NA (no label)."""
    return build_label_frame(tables, moments)["label"]


def label_exclusion_reasons(tables: HistoryTables, moments: pd.DataFrame) -> pd.Series:
    """Per moment: why it has no label (one of :data:`EXCLUSION_REASONS`), NA when labelled."""
    return build_label_frame(tables, moments)["exclusion_reason"]
