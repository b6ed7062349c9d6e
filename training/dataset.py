"""The training set: labelled scoring moments with their point-in-time features and a time split.

Each posting appears at several moments of its life: at the order and then every
``every_hours`` while it is open. A training set at ``as_of`` is built from the history as it was
known at ``as_of`` (:func:`known_at`), labels included, so a model trained "as of last month"
never sees what happened since. Postings ordered within the last ``label_window_days`` are left
out, and the window must be about as long as postings live: a posting still open at ``as_of``
has no label and drops out, and whether it is still open depends on how it ends (late parcels
that end in a cancellation live longest). With a window shorter than most lifetimes the newest
postings, the calibration and test splits, keep mainly the quickly resolved ones, and the
holdout is no longer the population the model scores: its calibration error then measures the
censoring, not the model. Cross-border postings live up to five or six weeks.

The split is by order time, per posting: train on the oldest postings, then validation (early
stopping), calibration, and test on the newest; a posting's moments all go to one side.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.aggregates import DEFAULT_PRIOR_STRENGTH, HistoryAggregates, build_resolutions
from core.features import FEATURE_COLUMNS, build_feature_rows, build_promise_at
from core.point_in_time import NAT_NS, from_ns, to_ns, to_utc
from core.tables import HistoryTables
from training.labels import CENSORED, build_label_frame

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "calibration", "test")
SLICE_COLUMNS = ["carrier_id", "days_since_order", "is_handed_over"]
KEY_COLUMNS = ["posting_number", "as_of", "ordered_at", "label", "split"]
# is_handed_over is a feature and a slice: it appears once, among the features.
TRAINING_SET_COLUMNS = [
    *KEY_COLUMNS,
    *(column for column in SLICE_COLUMNS if column not in FEATURE_COLUMNS),
    *FEATURE_COLUMNS,
]
_CANCELLATION_FIELDS = (
    "cancel_reason_id",
    "cancel_reason",
    "cancellation_type",
    "cancellation_initiator",
    "cancelled_by",
    "cancelled_after_ship",
)
_NS_PER_DAY = 86_400_000_000_000


class SnapshotConfig(BaseModel):
    """Which moments become training rows, which postings are used, and how they are split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every_hours: float = Field(24.0, gt=0, description="Hours between a posting's moments.")
    include_order_moment: bool = Field(True, description="A moment at the order time itself.")
    label_window_days: float = Field(
        40.0,
        ge=0,
        description="Postings ordered this close to as_of are not used (most are still open).",
    )
    max_moments_per_posting: int | None = Field(
        30, ge=1, description="Keep at most this many (the earliest) moments per posting."
    )
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="Postings for early stopping.")
    calibration_fraction: float = Field(
        0.1, gt=0, lt=1, description="Postings for the calibrator, after validation."
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="The newest postings, held out.")
    rate_prior_strength: float = Field(
        DEFAULT_PRIOR_STRENGTH, ge=0, description="Pseudo-postings smoothing the history rates."
    )

    @model_validator(mode="after")
    def _leave_postings_to_train(self) -> SnapshotConfig:
        held_out = self.valid_fraction + self.calibration_fraction + self.test_fraction
        if held_out >= 1:
            raise ValueError(
                f"valid + calibration + test fractions must leave postings to train on "
                f"(they sum to {held_out:g})"
            )
        return self


# --- the history as known at a moment ---------------------------------------------------------


def _postings_known_at(tables: HistoryTables, as_of: pd.Timestamp) -> pd.DataFrame:
    """Postings ordered by ``as_of``, with every later fact removed from them.

    Closing and handover times after ``as_of`` are dropped (and a later cancellation's fields
    with them); the promise becomes the one in force at ``as_of``; the export-time status is kept
    only where it was already final at ``as_of`` (or cannot be placed in time), else unknown.
    """
    as_of_ns = as_of.value
    postings = tables.postings
    ordered_ns = to_ns(postings["ordered_at"])
    keep = (ordered_ns != NAT_NS) & (ordered_ns <= as_of_ns)
    resolutions = build_resolutions(postings)
    closed_ns = to_ns(resolutions["closed_at"])
    status_known = ((closed_ns != NAT_NS) & (closed_ns <= as_of_ns)) | resolutions[
        "closing_time_unknown"
    ].to_numpy()

    promise = build_promise_at(
        tables,
        pd.DataFrame({"posting_number": postings["posting_number"].to_numpy(), "as_of": as_of}),
    )
    out = postings.copy()
    out["promised_delivery_begin_at"] = promise["promised_delivery_begin_at"].array
    out["promised_delivery_end_at"] = promise["promised_delivery_end_at"].array
    out.loc[~status_known, "status"] = pd.NA
    for column in ("handed_over_at", "delivered_at"):
        out.loc[to_ns(out[column]) > as_of_ns, column] = pd.NaT
    later_cancel = to_ns(out["cancelled_at"]) > as_of_ns
    out.loc[later_cancel, "cancelled_at"] = pd.NaT
    for column in _CANCELLATION_FIELDS:
        out.loc[later_cancel, column] = pd.NA
    return out[keep].reset_index(drop=True)


def known_at(tables: HistoryTables, as_of: pd.Timestamp | str) -> HistoryTables:
    """The history as it was known at ``as_of``: nothing that happened later remains.

    Events after ``as_of`` (or without a time) are dropped, postings ordered after it too, with
    their items. The remaining postings lose their closing and handover times after ``as_of``
    (and a later cancellation's fields), carry the promise in force at ``as_of`` and keep their
    export-time status only where it was already final then. Product cards created later are
    dropped. Features at any moment up to ``as_of`` are the same on the result as on ``tables``.
    """
    as_of = to_utc(as_of)
    postings = _postings_known_at(tables, as_of)
    items = tables.items[tables.items["posting_number"].isin(postings["posting_number"])]
    events = tables.events
    event_ns = to_ns(events["at"])
    events = events[(event_ns != NAT_NS) & (event_ns <= as_of.value)]
    products = tables.products[~(to_ns(tables.products["created_at"]) > as_of.value)].copy()
    products.loc[to_ns(products["updated_at"]) > as_of.value, "updated_at"] = pd.NaT
    report = dataclasses.replace(
        tables.report,
        files_read=dict(tables.report.files_read),
        missing_optional=list(tables.report.missing_optional),
        warnings=list(tables.report.warnings),
    )
    return HistoryTables(
        postings=postings,
        items=items.reset_index(drop=True),
        events=events.reset_index(drop=True),
        products=products.reset_index(drop=True),
        rejects=tables.rejects.copy(),
        report=report,
    )


# --- scoring moments --------------------------------------------------------------------------


def _usable_postings(
    tables: HistoryTables, as_of: pd.Timestamp, config: SnapshotConfig
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Postings that give training moments: ordered before the label window, placeable in time.

    Returns their ``posting_number``, ``ordered_ns`` and ``closed_ns``, and what was left out.
    """
    postings = tables.postings
    resolutions = build_resolutions(postings)
    ordered_ns = to_ns(postings["ordered_at"])
    window_start_ns = as_of.value - round(config.label_window_days * _NS_PER_DAY)
    ordered = (ordered_ns != NAT_NS) & (ordered_ns <= as_of.value)
    in_window = ordered & (ordered_ns > window_start_ns)
    unplaceable = ordered & ~in_window & resolutions["closing_time_unknown"].to_numpy()
    usable = ordered & ~in_window & ~unplaceable
    frame = pd.DataFrame(
        {
            "posting_number": postings["posting_number"].astype("string").to_numpy()[usable],
            "ordered_ns": ordered_ns[usable],
            "closed_ns": to_ns(resolutions["closed_at"])[usable],
        }
    )
    frame = frame.sort_values(["ordered_ns", "posting_number"], kind="stable", ignore_index=True)
    left_out = {
        "postings_in_label_window": int(in_window.sum()),
        "postings_closing_time_unknown": int(unplaceable.sum()),
    }
    return frame, left_out


def _moments_of(
    postings: pd.DataFrame, as_of: pd.Timestamp, config: SnapshotConfig
) -> pd.DataFrame:
    """Every moment ``ordered_at + k * every_hours`` at which a posting is open, up to ``as_of``.

    Open at t means ``t < closed_at``; ``k`` starts at 0 with the order moment, else 1, and at
    most ``max_moments_per_posting`` (the earliest) are kept.
    """
    step = max(round(config.every_hours * 3_600_000_000_000), 1)
    ordered = postings["ordered_ns"].to_numpy()
    closed = postings["closed_ns"].to_numpy()
    first_k = 0 if config.include_order_moment else 1
    last_k_known = (as_of.value - ordered) // step
    # Largest k with ordered + k * step < closed.
    last_k_open = np.where(closed == NAT_NS, last_k_known, (closed - ordered - 1) // step)
    count = np.clip(np.minimum(last_k_known, last_k_open) - first_k + 1, 0, None)
    if config.max_moments_per_posting is not None:
        count = np.minimum(count, config.max_moments_per_posting)
    posting = np.repeat(np.arange(len(postings)), count)
    k = first_k + np.arange(len(posting)) - np.repeat(np.cumsum(count) - count, count)
    return pd.DataFrame(
        {
            "posting_number": pd.array(
                postings["posting_number"].to_numpy()[posting], dtype="string"
            ),
            "as_of": from_ns(ordered[posting] + k * step).array,
            "ordered_at": from_ns(ordered[posting]).array,
        }
    )


def build_scoring_moments(
    tables: HistoryTables, as_of: pd.Timestamp | str, config: SnapshotConfig
) -> pd.DataFrame:
    """The training moments (``posting_number``, ``as_of``) of the history known at ``as_of``.

    One moment at each order (if configured) and every ``every_hours`` while the posting is open,
    up to ``as_of``, for the postings ordered before the label window. ``attrs`` count the
    postings left out.
    """
    as_of = to_utc(as_of)
    known = known_at(tables, as_of)
    postings, left_out = _usable_postings(known, as_of, config)
    moments = _moments_of(postings, as_of, config)[["posting_number", "as_of"]]
    moments.attrs.update(left_out)
    return moments


# --- split ------------------------------------------------------------------------------------


def assign_splits(postings: pd.DataFrame, config: SnapshotConfig) -> pd.Series:
    """The split of each posting (``posting_number``, ``ordered_at``) by order time.

    The oldest postings train, the next ``valid_fraction`` validate, then ``calibration_fraction``
    calibrate, and the newest ``test_fraction`` test. Ties in order time are broken by posting
    number so the split does not depend on row order. Returns a string Series indexed like
    ``postings``.
    """
    order = np.lexsort(
        (
            postings["posting_number"].astype("string").to_numpy(dtype=object),
            to_ns(postings["ordered_at"]),
        )
    )
    n = len(postings)
    fractions = np.cumsum(
        [
            1 - config.valid_fraction - config.calibration_fraction - config.test_fraction,
            config.valid_fraction,
            config.calibration_fraction,
        ]
    )
    bounds = np.round(fractions * n).astype("int64")
    rank = np.empty(n, dtype="int64")
    rank[order] = np.arange(n)
    split = np.asarray(SPLITS, dtype=object)[np.searchsorted(bounds, rank, side="right")]
    return pd.Series(pd.array(split, dtype="string"), index=postings.index, name="split")


# --- training set -----------------------------------------------------------------------------


def fit_training_aggregates(
    tables: HistoryTables, as_of: pd.Timestamp | str, config: SnapshotConfig
) -> HistoryAggregates:
    """The history aggregates a model trained at ``as_of`` carries (fitted on what was known)."""
    as_of = to_utc(as_of)
    return HistoryAggregates.fit(
        known_at(tables, as_of), as_of, prior_strength=config.rate_prior_strength
    )


def _label_counts(reasons: pd.Series) -> dict[str, object]:
    """How many moments are censored and excluded, by reason."""
    by_reason = reasons.value_counts().to_dict()
    censored = int(by_reason.get(CENSORED, 0))
    return {
        "censored": censored,
        "excluded": int(reasons.notna().sum()) - censored,
        "exclusion_reasons": {str(k): int(v) for k, v in sorted(by_reason.items())},
    }


def build_training_set(
    tables: HistoryTables,
    as_of: pd.Timestamp | str,
    config: SnapshotConfig,
    aggregates: HistoryAggregates | None = None,
) -> pd.DataFrame:
    """One row per labelled training moment, built only from what was known at ``as_of``.

    Columns: :data:`TRAINING_SET_COLUMNS` (``posting_number``, ``as_of``, ``ordered_at``,
    ``label`` 0/1, ``split``, the slice columns ``carrier_id``, ``days_since_order`` and
    ``is_handed_over``, and :data:`FEATURE_COLUMNS`), ordered by order time, posting and moment.
    ``aggregates`` default to :func:`fit_training_aggregates`; pass the model's own so training
    rows and serving share them. ``attrs`` hold the counts: moments, labelled, censored,
    excluded (and by reason), postings left out, rows and postings per split.
    """
    as_of = to_utc(as_of)
    known = known_at(tables, as_of)
    postings, left_out = _usable_postings(known, as_of, config)
    moments = _moments_of(postings, as_of, config)
    label_frame = build_label_frame(known, moments)
    counts = {"moments": len(moments), **_label_counts(label_frame["exclusion_reason"])}

    labelled = label_frame["label"].notna().to_numpy()
    rows = moments[labelled].reset_index(drop=True)
    rows["label"] = label_frame["label"].to_numpy()[labelled].astype("int8")
    if aggregates is None:
        aggregates = HistoryAggregates.fit(known, as_of, prior_strength=config.rate_prior_strength)
    features = build_feature_rows(known, rows, aggregates)

    posting_split = rows.drop_duplicates("posting_number")[["posting_number", "ordered_at"]]
    posting_split = posting_split.assign(split=assign_splits(posting_split, config))
    rows = rows.merge(posting_split[["posting_number", "split"]], on="posting_number", how="left")
    carrier = known.postings.set_index("posting_number")["carrier_id"]
    rows["carrier_id"] = carrier.reindex(rows["posting_number"]).to_numpy()
    rows["days_since_order"] = (rows["as_of"] - rows["ordered_at"]) / pd.Timedelta(days=1)
    training_set = pd.concat([rows, features.reset_index(drop=True)], axis=1)[TRAINING_SET_COLUMNS]

    counts.update(
        labelled=len(training_set),
        positives=int(training_set["label"].sum()),
        **left_out,
        split_rows={s: int((training_set["split"] == s).sum()) for s in SPLITS},
        split_postings={s: int((posting_split["split"] == s).sum()) for s in SPLITS},
    )
    training_set.attrs.update(as_of=as_of.isoformat(), **counts)
    logger.info(
        "training set at %s: %d moments, %d labelled (%d positive), %d censored, %d excluded %s; "
        "%d postings in the label window, %d without a closing time; rows per split %s",
        as_of,
        counts["moments"],
        counts["labelled"],
        counts["positives"],
        counts["censored"],
        counts["excluded"],
        counts["exclusion_reasons"],
        left_out["postings_in_label_window"],
        left_out["postings_closing_time_unknown"],
        counts["split_rows"],
    )
    return training_set
