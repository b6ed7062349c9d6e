"""The training set: the history as known at as_of, scoring moments, labels, time split."""

from __future__ import annotations

import itertools
from functools import cache

import pandas as pd
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tables_factory import (
    HOUR,
    event_row,
    item_row,
    make_tables,
    posting_row,
    random_histories,
    random_shop,
    rewritten_futures,
    utc,
)

from core.aggregates import HistoryAggregates
from core.features import FEATURE_COLUMNS, build_feature_rows
from core.tables import HistoryTables
from training.dataset import (
    SPLITS,
    TRAINING_SET_COLUMNS,
    SnapshotConfig,
    build_scoring_moments,
    build_training_set,
    known_at,
)

SHOP_CONFIG = SnapshotConfig(label_window_days=7, max_moments_per_posting=10)


@cache
def shop() -> tuple[HistoryTables, pd.Timestamp]:
    return random_shop(n_postings=300, days=60, seed=3)


@cache
def shop_training_set() -> pd.DataFrame:
    tables, export_at = shop()
    return build_training_set(tables, export_at, SHOP_CONFIG)


# --- configuration ----------------------------------------------------------------------------


def test_config_defaults_and_unknown_keys() -> None:
    config = SnapshotConfig()
    assert (config.every_hours, config.include_order_moment) == (24.0, True)
    with pytest.raises(pydantic.ValidationError, match="every_hour"):
        SnapshotConfig(every_hour=12)


def test_config_keeps_postings_to_train_on() -> None:
    with pytest.raises(pydantic.ValidationError, match="leave postings to train"):
        SnapshotConfig(valid_fraction=0.4, calibration_fraction=0.3, test_fraction=0.3)


# --- known_at ---------------------------------------------------------------------------------


def test_known_at_forgets_later_closings_and_restores_the_promise_then() -> None:
    tables = make_tables(
        postings=[
            posting_row(
                "P1",
                "2026-03-01",
                status="cancelled",
                cancelled_by="buyer",
                cancellation_type="client",
                cancelled_at=utc("2026-03-05"),
                handed_over_at=utc("2026-03-04"),
                promised_delivery_end_at=utc("2026-03-09"),
            ),
            posting_row("P2", "2026-03-01", status="delivered", delivered_at=utc("2026-03-02")),
            posting_row("P3", "2026-03-04"),
        ],
        items=[item_row("P1"), item_row("P3")],
        events=[
            event_row("carrier_scan", "2026-03-02", posting_number="P1"),
            event_row("carrier_scan", "2026-03-04", posting_number="P1"),
            event_row(
                "delivery_date_change",
                "2026-03-04",
                posting_number="P1",
                old_delivery_end_at=utc("2026-03-06"),
                delivery_end_at=utc("2026-03-09"),
            ),
        ],
    )
    known = known_at(tables, "2026-03-03")
    p1, p2 = known.postings.iloc[0], known.postings.iloc[1]
    assert known.postings["posting_number"].tolist() == ["P1", "P2"]
    assert pd.isna(p1["cancelled_at"]) and pd.isna(p1["cancelled_by"])
    assert pd.isna(p1["cancellation_type"]) and pd.isna(p1["status"])
    assert pd.isna(p1["handed_over_at"])
    assert p1["promised_delivery_end_at"] == utc("2026-03-06")
    assert p2["status"] == "delivered"  # final already at as_of
    assert known.items["posting_number"].tolist() == ["P1"]
    assert known.events["at"].tolist() == [utc("2026-03-02")]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_known_at_is_the_same_whatever_the_future_and_keeps_the_features(
    data: st.DataObject,
) -> None:
    tables, as_of = data.draw(random_histories())
    known = known_at(tables, as_of)
    other = known_at(data.draw(rewritten_futures(tables, as_of)), as_of)
    for name in ("postings", "items", "events"):
        pd.testing.assert_frame_equal(getattr(other, name), getattr(known, name), obj=name)

    postings = known.postings
    assert (postings["ordered_at"] <= as_of).all()
    for column in ("handed_over_at", "cancelled_at", "delivered_at"):
        assert not (postings[column] > as_of).any(), column
    assert (known.events["at"] <= as_of).all()

    moments = pd.DataFrame({"posting_number": postings["posting_number"], "as_of": as_of})
    pd.testing.assert_frame_equal(
        build_feature_rows(known, moments, HistoryAggregates.fit(known, as_of)),
        build_feature_rows(tables, moments, HistoryAggregates.fit(tables, as_of)),
    )


# --- scoring moments --------------------------------------------------------------------------


def moments_tables() -> HistoryTables:
    return make_tables(
        postings=[
            posting_row("P1", "2026-03-01 10:00", status="delivered")
            | {"delivered_at": utc("2026-03-04 09:00")},
            posting_row("P2", "2026-03-01 10:00"),  # open until the end
            posting_row("P3", "2026-03-09"),  # inside the label window
            posting_row("P4", "2026-03-01", status="cancelled"),  # cannot be placed in time
        ]
    )


def test_moments_start_at_the_order_and_repeat_while_open() -> None:
    config = SnapshotConfig(label_window_days=2)
    moments = build_scoring_moments(moments_tables(), "2026-03-10", config)
    p1 = moments.loc[moments["posting_number"] == "P1", "as_of"].tolist()
    assert p1 == [utc("2026-03-01 10:00"), utc("2026-03-02 10:00"), utc("2026-03-03 10:00")]
    p2 = moments.loc[moments["posting_number"] == "P2", "as_of"]
    assert len(p2) == 9 and p2.max() == utc("2026-03-09 10:00")
    assert set(moments["posting_number"]) == {"P1", "P2"}
    assert moments.attrs["postings_in_label_window"] == 1
    assert moments.attrs["postings_closing_time_unknown"] == 1


def test_moments_without_the_order_moment_and_with_a_cap() -> None:
    config = SnapshotConfig(
        label_window_days=2, every_hours=12, include_order_moment=False, max_moments_per_posting=4
    )
    moments = build_scoring_moments(moments_tables(), "2026-03-10", config)
    p1 = moments.loc[moments["posting_number"] == "P1", "as_of"]
    assert p1.tolist() == [utc("2026-03-01 22:00") + k * 12 * HOUR for k in range(4)]


# --- the training set -------------------------------------------------------------------------


def test_training_set_columns_labels_and_counts() -> None:
    frame = shop_training_set()
    assert list(frame.columns) == TRAINING_SET_COLUMNS
    assert set(FEATURE_COLUMNS) <= set(frame.columns)
    assert set(frame["label"].unique()) == {0, 1}
    assert set(frame["split"]) == set(SPLITS)
    assert (frame["days_since_order"] >= 0).all()
    assert frame["days_since_order"].equals(frame["hours_since_order"] / 24)
    counts = frame.attrs
    assert counts["labelled"] == len(frame)
    assert counts["moments"] == counts["labelled"] + counts["censored"] + counts["excluded"]
    assert counts["censored"] > 0 and counts["excluded"] > 0
    assert sum(counts["split_rows"].values()) == len(frame)


def test_training_set_leaves_out_the_label_window() -> None:
    _, export_at = shop()
    frame = shop_training_set()
    assert frame["ordered_at"].max() <= export_at - pd.Timedelta(days=7)
    assert frame.attrs["postings_in_label_window"] > 0


def test_split_is_by_order_time_with_no_posting_on_two_sides() -> None:
    frame = shop_training_set()
    assert frame.groupby("posting_number")["split"].nunique().max() == 1
    spans = frame.groupby("split")["ordered_at"].agg(["min", "max"]).loc[list(SPLITS)]
    for older, newer in itertools.pairwise(SPLITS):
        assert spans.loc[older, "max"] <= spans.loc[newer, "min"], (older, newer)
    postings = frame.attrs["split_postings"]
    assert postings["train"] > postings["test"] > postings["valid"] > 0


def test_a_posting_resolved_after_as_of_is_censored_not_negative() -> None:
    tables = make_tables(
        postings=[
            posting_row("LATE", "2026-03-01", status="delivered")
            | {"delivered_at": utc("2026-03-20")},
            posting_row("EARLY", "2026-03-01", status="delivered")
            | {"delivered_at": utc("2026-03-03")},
        ],
        items=[item_row("LATE"), item_row("EARLY")],
    )
    frame = build_training_set(tables, "2026-03-10", SnapshotConfig(label_window_days=1))
    assert set(frame["posting_number"]) == {"EARLY"}
    assert frame.attrs["censored"] == 10  # LATE daily from its order to as_of, both included


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_training_set_reads_nothing_after_as_of(data: st.DataObject) -> None:
    tables, export_at = shop()
    as_of = export_at - pd.Timedelta(days=20)
    other = data.draw(rewritten_futures(tables, as_of))
    expected = build_training_set(tables, as_of, SHOP_CONFIG)
    pd.testing.assert_frame_equal(build_training_set(other, as_of, SHOP_CONFIG), expected)
    assert expected.attrs == build_training_set(other, as_of, SHOP_CONFIG).attrs
