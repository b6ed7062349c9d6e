"""History aggregates: counts, smoothing, point-in-time lookups, storage with the model."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
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
    rewritten_futures,
    utc,
)

from core.aggregates import (
    BUYER_CANCELLED,
    COLLECTED_KINDS,
    DELIVERED,
    LOOKUP_COLUMNS,
    OTHER_CANCELLED,
    UNKNOWN_CANCELLED,
    HistoryAggregates,
    build_resolutions,
)
from core.point_in_time import NAT_NS, PointInTimeIndex, latest_row
from core.tables import PUSH_KINDS, SCAN_KINDS, HistoryTables


def keys_at(
    as_of: str,
    *,
    carrier_id: object = 1,
    region: object = "Moscow",
    customer_id: object = 7,
    ordered_at: str = "2026-01-01",
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "carrier_id": pd.array([carrier_id], dtype="Int64"),
            "region": pd.array([region], dtype="string"),
            "customer_id": pd.array([customer_id], dtype="Int64"),
            "ordered_at": [utc(ordered_at)],
            "as_of": [utc(as_of)],
        }
    )


def shop() -> HistoryTables:
    """Carrier 1 / Moscow / customer 7: two buyer cancellations, one delivery, a seller one."""
    common = {"carrier_id": 1, "region": "Moscow", "customer_id": 7}
    return make_tables(
        postings=[
            posting_row("B1", "2026-01-01", cancelled_by="buyer", **common)
            | {"status": "cancelled", "cancelled_at": utc("2026-01-03")},
            posting_row("B2", "2026-01-02", cancelled_by="buyer", **common)
            | {"status": "cancelled", "cancelled_at": utc("2026-01-05")},
            posting_row("D1", "2026-01-02", status="delivered", **common)
            | {"delivered_at": utc("2026-01-04")},
            posting_row("S1", "2026-01-02", status="cancelled", cancelled_by="seller", **common)
            | {"cancelled_at": utc("2026-01-04")},
            posting_row("U1", "2026-01-02", status="cancelled", cancelled_by="buyer", **common),
        ],
        items=[item_row(n, sku=5) for n in ("B1", "B2", "D1", "S1", "U1")],
    )


def test_resolutions_take_the_earlier_closing_and_name_who_cancelled() -> None:
    tables = make_tables(
        postings=[
            posting_row("A", "2026-01-01", cancelled_by="buyer", cancelled_at=utc("2026-01-02")),
            posting_row("B", "2026-01-01", cancelled_by="ozon", cancelled_at=utc("2026-01-02")),
            posting_row("C", "2026-01-01", cancelled_by="unknown", cancelled_at=utc("2026-01-02")),
            posting_row("D", "2026-01-01", delivered_at=utc("2026-01-02")),
            posting_row(
                "E",
                "2026-01-01",
                delivered_at=utc("2026-01-02"),
                cancelled_by="buyer",
                cancelled_at=utc("2026-01-03"),
            ),
            posting_row("F", "2026-01-01", status="delivered"),
            posting_row("G", "2026-01-01"),
        ]
    )
    resolutions = build_resolutions(tables.postings)
    assert resolutions["outcome"].tolist() == [
        BUYER_CANCELLED,
        OTHER_CANCELLED,
        UNKNOWN_CANCELLED,
        DELIVERED,
        DELIVERED,
        pd.NA,
        pd.NA,
    ]
    assert resolutions["closing_time_unknown"].tolist() == [False] * 5 + [True, False]


def test_latest_row_takes_the_last_row_at_or_before_and_the_last_of_ties() -> None:
    table_keys = np.array([0, 0, 0, 1])
    table_ns = np.array([10, 20, 20, 5])
    query_keys = np.array([0, 0, 0, 1, 2, 0])
    query_ns = np.array([5, 10, 25, 5, 99, 20])
    assert latest_row(table_keys, table_ns, query_keys, query_ns).tolist() == [-1, 0, 2, 3, -1, 2]
    strictly = latest_row(table_keys, table_ns, query_keys, query_ns, strictly_before=True)
    assert strictly.tolist() == [-1, -1, 2, -1, -1, 0]


def test_only_buyer_cancellations_and_deliveries_with_a_time_count() -> None:
    aggregates = HistoryAggregates.fit(shop(), "2026-01-10", prior_strength=0.0)
    row = aggregates.lookup(keys_at("2026-01-10", ordered_at="2026-01-06")).iloc[0]
    # 2 buyer cancellations of 3 resolved: the seller's and the untimed one count as nothing.
    assert row["carrier_buyer_cancel_rate"] == pytest.approx(2 / 3)
    assert row["region_buyer_cancel_rate"] == pytest.approx(2 / 3)
    assert row["buyer_earlier_postings"] == 5.0
    assert row["buyer_earlier_buyer_cancels"] == 2.0


def test_lookup_is_point_in_time_within_the_fitted_period() -> None:
    aggregates = HistoryAggregates.fit(shop(), "2026-01-10", prior_strength=0.0)
    rates = [
        aggregates.lookup(keys_at(moment)).iloc[0]["carrier_buyer_cancel_rate"]
        for moment in ("2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05")
    ]
    assert np.isnan(rates[0])  # nothing resolved yet, no global rate
    assert rates[1:] == pytest.approx([1.0, 1 / 2, 2 / 3])
    cancels = aggregates.lookup(keys_at("2026-01-04")).iloc[0]["buyer_earlier_buyer_cancels"]
    assert cancels == 1.0


def test_lookup_after_the_fitted_as_of_returns_the_values_at_it() -> None:
    aggregates = HistoryAggregates.fit(shop(), "2026-01-04", prior_strength=0.0)
    at_fit = aggregates.lookup(keys_at("2026-01-04", ordered_at="2026-01-04"))
    later = aggregates.lookup(keys_at("2026-03-01", ordered_at="2026-03-01"))
    pd.testing.assert_frame_equal(later, at_fit)
    assert later.iloc[0]["carrier_buyer_cancel_rate"] == pytest.approx(1 / 2)


def test_unseen_keys_get_the_global_rate_and_unknown_customers_no_counts() -> None:
    aggregates = HistoryAggregates.fit(shop(), "2026-01-10", prior_strength=3.0)
    row = aggregates.lookup(
        keys_at("2026-01-10", carrier_id=99, region=None, customer_id=None)
    ).iloc[0]
    assert row["carrier_buyer_cancel_rate"] == pytest.approx(2 / 3)
    assert row["region_buyer_cancel_rate"] == pytest.approx(2 / 3)
    assert np.isnan(row["buyer_earlier_postings"])
    assert np.isnan(row["buyer_earlier_buyer_cancels"])


def test_sku_rate_is_weighted_by_line_value() -> None:
    tables = make_tables(
        postings=[
            posting_row("C", "2026-01-01", cancelled_by="buyer", cancelled_at=utc("2026-01-02")),
            posting_row("D", "2026-01-01", delivered_at=utc("2026-01-02")),
        ],
        items=[item_row("C", sku=1), item_row("D", sku=2)],
    )
    aggregates = HistoryAggregates.fit(tables, "2026-01-05", prior_strength=2.0)
    lines = pd.DataFrame(
        {"row": [0, 0], "sku": pd.array([1, 2], dtype="Int64"), "weight": [1.0, 3.0]}
    )
    row = aggregates.lookup(keys_at("2026-01-05"), lines).iloc[0]
    sku_1, sku_2 = (1 + 2 * 0.5) / 3, (0 + 2 * 0.5) / 3
    assert row["sku_buyer_cancel_rate"] == pytest.approx((sku_1 + 3 * sku_2) / 4)


def test_aggregates_remember_since_when_the_shop_collects_pushes_and_scans(
    tmp_path: Path,
) -> None:
    """The first push and scan known at the fit's as_of travel with the model (a REST request
    holds one posting's events and cannot tell a shop that collects scans from one that does
    not); a later scan is not known at as_of; aggregates stored without them know nothing."""
    base = shop()
    tables = make_tables(
        postings=base.postings.to_dict("records"),
        items=base.items.to_dict("records"),
        events=[
            event_row("carrier_scan", "2026-01-03", posting_number="B1"),
            event_row("state_change", "2026-01-02T06:00", posting_number="B2", state="x"),
            event_row("state_change", "2026-01-01T06:00", posting_number="B1", state="x"),
            event_row("carrier_scan", "2026-01-02", posting_number="D1"),
            {"kind": "carrier_scan", "at": pd.NaT, "posting_number": "D1"},
        ],
    )
    aggregates = HistoryAggregates.fit(tables, "2026-01-10")
    assert aggregates.collecting_since(PUSH_KINDS) == utc("2026-01-01T06:00").value
    assert aggregates.collecting_since(SCAN_KINDS) == utc("2026-01-02").value
    assert HistoryAggregates.fit(tables, "2026-01-01T12:00").collecting_since(SCAN_KINDS) == NAT_NS

    for name, frame in aggregates.to_frames().items():
        frame.to_parquet(tmp_path / f"{name}.parquet")
    frames = {path.stem: pd.read_parquet(path) for path in tmp_path.glob("*.parquet")}
    restored = HistoryAggregates.from_frames(frames)
    assert restored.collecting_since(PUSH_KINDS) == aggregates.collecting_since(PUSH_KINDS)
    assert restored.collecting_since(SCAN_KINDS) == aggregates.collecting_since(SCAN_KINDS)
    frames["meta"] = frames["meta"].drop(columns=list(COLLECTED_KINDS))
    assert HistoryAggregates.from_frames(frames).collecting_since(SCAN_KINDS) == NAT_NS


def test_frames_round_trip_through_parquet(tmp_path: Path) -> None:
    aggregates = HistoryAggregates.fit(shop(), "2026-01-10", prior_strength=3.0)
    for name, frame in aggregates.to_frames().items():
        frame.to_parquet(tmp_path / f"{name}.parquet")
    restored = HistoryAggregates.from_frames(
        {path.stem: pd.read_parquet(path) for path in tmp_path.glob("*.parquet")}
    )
    assert restored.as_of_ == aggregates.as_of_
    assert restored.prior_strength == 3.0
    keys = pd.concat([keys_at(m) for m in ("2026-01-03", "2026-01-04", "2026-02-01")])
    pd.testing.assert_frame_equal(restored.lookup(keys), aggregates.lookup(keys))


def test_negative_prior_strength_is_refused() -> None:
    with pytest.raises(ValueError, match="prior_strength"):
        HistoryAggregates(prior_strength=-1.0)


def random_keys(tables: HistoryTables, as_of: pd.Timestamp) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every posting's keys at a few moments up to ``as_of``, with one or two lines each."""
    postings = tables.postings
    moments = [as_of - hours * HOUR for hours in (0, 7, 50, 24 * 9)]
    keys = pd.concat(
        [
            pd.DataFrame(
                {
                    "carrier_id": postings["carrier_id"],
                    "region": postings["region"],
                    "customer_id": postings["customer_id"],
                    "ordered_at": postings["ordered_at"].clip(upper=moment),
                    "as_of": moment,
                }
            )
            for moment in moments
        ],
        ignore_index=True,
    )
    rows = np.arange(len(keys))
    every_other = rows[::2]
    lines = pd.DataFrame(
        {
            "row": np.r_[rows, every_other],
            "sku": pd.array(np.r_[rows % 3 + 1, np.full(len(every_other), 2)], dtype="Int64"),
            "weight": np.r_[1.0 + rows % 2, np.full(len(every_other), 5.0)],
        }
    )
    return keys, lines


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_what_resolves_after_as_of_never_changes_an_aggregate_at_as_of(
    data: st.DataObject,
) -> None:
    tables, as_of = data.draw(random_histories())
    other = data.draw(rewritten_futures(tables, as_of))
    keys, lines = random_keys(tables, as_of)
    fitted, fitted_other = HistoryAggregates.fit(tables, as_of), HistoryAggregates.fit(other, as_of)
    # The stored state itself holds nothing after as_of.
    for name, frame in fitted.to_frames().items():
        pd.testing.assert_frame_equal(fitted_other.to_frames()[name], frame, obj=name)
    expected = fitted.lookup(keys, lines)
    pd.testing.assert_frame_equal(fitted_other.lookup(keys, lines), expected)
    # Fitted later, looked up at as_of or before: the same numbers (time-stamped counts).
    later = HistoryAggregates.fit(other, as_of + 24 * 30 * HOUR)
    pd.testing.assert_frame_equal(later.lookup(keys, lines), expected)
    # Fitted at as_of, looked up after it (serving): the values at as_of, not the future's.
    at_fit = fitted.lookup(keys.assign(as_of=as_of), lines)
    after = fitted_other.lookup(keys.assign(as_of=as_of + 240 * HOUR), lines)
    pd.testing.assert_frame_equal(after, at_fit)
    assert list(expected.columns) == LOOKUP_COLUMNS


_SMALL_TIMES = st.one_of(st.integers(-1, 6), st.just(int(NAT_NS)))


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(st.tuples(st.integers(-1, 3), _SMALL_TIMES), max_size=30),
    queries=st.lists(st.tuples(st.integers(-1, 4), _SMALL_TIMES), max_size=10),
    strictly_before=st.booleans(),
)
def test_latest_row_gives_the_same_rows_by_sorting_and_by_merge_asof(
    table, queries, strictly_before
) -> None:
    """Tiny inputs compare every query with every row, small ones take the sorted index, large
    ones merge_asof: same positions,
    ties (equal key and time) won by the highest position, NaT and -1 keys never matching."""
    import core.point_in_time as point_in_time

    table_keys = np.array([k for k, _ in table], dtype="int64")
    table_ns = np.array([t for _, t in table], dtype="int64")
    query_keys = np.array([k for k, _ in queries], dtype="int64")
    query_ns = np.array([t for _, t in queries], dtype="int64")
    by_index = PointInTimeIndex(table_keys, table_ns).latest(
        query_keys, query_ns, strictly_before=strictly_before
    )
    by_comparison = point_in_time.latest_by_comparison(
        table_keys, table_ns, query_keys, query_ns, strictly_before=strictly_before
    )
    with (
        mock.patch.object(point_in_time, "SMALL_LOOKUP_SIZE", -1),
        mock.patch.object(point_in_time, "TINY_LOOKUP_PAIRS", -1),
    ):
        by_merge = latest_row(
            table_keys, table_ns, query_keys, query_ns, strictly_before=strictly_before
        )
    expected = []
    for key, at in queries:
        rows = [
            i
            for i, (k, t) in enumerate(table)
            if key >= 0
            and at != NAT_NS
            and k == key
            and t != NAT_NS
            and (t < at if strictly_before else t <= at)
        ]
        best = max(rows, key=lambda i: (table[i][1], i), default=-1)
        expected.append(best)
    assert by_index.tolist() == expected
    assert by_comparison.tolist() == expected
    assert by_merge.tolist() == expected
