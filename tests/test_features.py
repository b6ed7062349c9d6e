"""The feature function: hand-computed examples per family, missing inputs, point in time."""

from __future__ import annotations

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

from core.aggregates import HistoryAggregates
from core.features import (
    CATEGORICAL_COLUMNS,
    DELIVERY_STAGES,
    FEATURE_COLUMNS,
    FEATURE_FAMILIES,
    STATIC_COLUMNS,
    build_feature_rows,
    build_features,
    open_postings_at,
)
from core.tables import HistoryTables

# The future-rewrite property is the one that guards leakage: it gets the most examples.
LEAKAGE_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROPERTY_SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def features_at(tables: HistoryTables, posting: str, *moments: str) -> pd.DataFrame:
    """Feature rows of one posting at the given moments."""
    frame = pd.DataFrame({"posting_number": posting, "as_of": [utc(m) for m in moments]})
    return build_feature_rows(tables, frame)


def moments_before(tables: HistoryTables, as_of: pd.Timestamp) -> pd.DataFrame:
    """Every posting ordered by ``as_of`` at its order, every 13 hours, and at ``as_of``."""
    rows = []
    for number, ordered_at in zip(
        tables.postings["posting_number"], tables.postings["ordered_at"], strict=True
    ):
        moment = ordered_at
        while moment <= as_of:
            rows.append((number, moment))
            moment += 13 * HOUR
        if ordered_at <= as_of:
            rows.append((number, as_of))
    return pd.DataFrame(rows, columns=["posting_number", "as_of"]).astype(
        {"as_of": "datetime64[ns, UTC]"}
    )


# --- the column contract ----------------------------------------------------------------------


def test_columns_are_the_families_in_order_and_static_and_categorical_are_subsets() -> None:
    assert [c for family in FEATURE_FAMILIES.values() for c in family] == FEATURE_COLUMNS
    assert len(set(FEATURE_COLUMNS)) == len(FEATURE_COLUMNS)
    assert set(CATEGORICAL_COLUMNS) <= set(FEATURE_COLUMNS)
    assert set(STATIC_COLUMNS) <= set(FEATURE_COLUMNS)


def test_output_has_the_feature_columns_strings_and_floats_in_moment_order() -> None:
    tables = make_tables(
        postings=[posting_row("P1", "2026-03-01", carrier_id=5), posting_row("P2", "2026-03-02")],
        items=[item_row("P1"), item_row("P2")],
    )
    moments = pd.DataFrame(
        {
            "posting_number": ["P2", "P1", "P2"],
            "as_of": [utc("2026-03-05"), utc("2026-03-03"), utc("2026-03-02 06:00")],
        },
        index=[10, 11, 12],
    )
    rows = build_feature_rows(tables, moments)
    assert list(rows.columns) == FEATURE_COLUMNS
    assert list(rows.index) == [10, 11, 12]
    assert rows["hours_since_order"].tolist() == [72.0, 48.0, 6.0]
    for column in FEATURE_COLUMNS:
        expected = "string" if column in CATEGORICAL_COLUMNS else "float64"
        assert rows[column].dtype == expected, column


# --- price since purchase ---------------------------------------------------------------------


def price_tables(**line_overrides: object) -> HistoryTables:
    return make_tables(
        postings=[posting_row("P1", "2026-03-01 10:00")],
        items=[
            item_row("P1", line_no=0, offer_id="A", quantity=1, unit_price=1000.0),
            item_row(
                "P1",
                line_no=1,
                offer_id="B",
                sku=2,
                quantity=3,
                unit_price=1000.0,
                **line_overrides,
            ),
        ],
        events=[
            event_row("price", "2026-02-10", offer_id="A", price=1100.0),  # changed before purchase
            event_row("price", "2026-02-20", offer_id="A", price=1000.0, currency_code="RUB"),
            event_row("price", "2026-03-02", offer_id="A", price=900.0, currency_code="RUB"),
            event_row("price", "2026-03-03", offer_id="A", price=800.0, old_price=1000.0),
            event_row("price", "2026-03-05", offer_id="A", price=950.0),  # after as_of
            event_row("price", "2026-02-25", offer_id="B", price=1000.0),
            event_row("price", "2026-03-02", offer_id="B", price=1000.0),  # observed, no change
            event_row("price", "2026-03-03", offer_id="B", price=1100.0),
        ],
    )


def test_price_since_purchase_weights_lines_by_value() -> None:
    # Line A (value 1000): now 800 (-20 %), lowest 800, 2 changes, a promotion appeared.
    # Line B (value 3000): now 1100 (+10 %), lowest 1000 (0 %), 1 change, no promotion.
    row = features_at(price_tables(), "P1", "2026-03-04").iloc[0]
    assert row["price_change_pct"] == pytest.approx((-20 * 1000 + 10 * 3000) / 4000)
    assert row["lowest_price_change_pct"] == pytest.approx((-20 * 1000 + 0 * 3000) / 4000)
    assert row["price_changes_since_purchase"] == pytest.approx((2 * 1000 + 1 * 3000) / 4000)
    assert row["promotion_since_purchase"] == pytest.approx(1000 / 4000)


def test_price_before_any_change_since_purchase_is_the_price_in_force() -> None:
    row = features_at(price_tables(), "P1", "2026-03-01 12:00").iloc[0]
    assert row["price_change_pct"] == 0.0
    assert row["lowest_price_change_pct"] == 0.0
    assert row["price_changes_since_purchase"] == 0.0
    assert row["promotion_since_purchase"] == 0.0


def test_price_in_another_currency_is_not_compared() -> None:
    # Line B is paid in CNY; its log has no currency (taken as the shop's), line A's log has RUB.
    row = features_at(price_tables(currency_code="CNY"), "P1", "2026-03-04").iloc[0]
    # Only line B's rows are comparable (no currency given), line A's RUB rows are not.
    assert row["price_change_pct"] == pytest.approx(-20.0 * 1000 / 4000 + 10.0 * 3000 / 4000)
    cny_a = make_tables(
        postings=[posting_row("P1", "2026-03-01 10:00")],
        items=[item_row("P1", offer_id="A", currency_code="CNY")],
        events=[event_row("price", "2026-03-02", offer_id="A", price=90.0, currency_code="RUB")],
    )
    row = features_at(cny_a, "P1", "2026-03-04").iloc[0]
    assert np.isnan(row["price_change_pct"])
    assert np.isnan(row["lowest_price_change_pct"])
    assert row["price_changes_since_purchase"] == 0.0


def test_offer_without_a_price_log_yet_is_missing_not_zero() -> None:
    tables = make_tables(
        postings=[posting_row("P1", "2026-03-01")],
        items=[item_row("P1", offer_id="A")],
        events=[event_row("price", "2026-03-10", offer_id="A", price=10.0)],
    )
    row = features_at(tables, "P1", "2026-03-05").iloc[0]
    assert row[FEATURE_FAMILIES["price_since_purchase"]].isna().all()


def test_simultaneous_rows_resolve_the_same_whatever_their_order() -> None:
    at = "2026-03-02"
    rows = [
        event_row("price", at, offer_id="A", price=900.0),
        event_row("price", at, offer_id="A", price=700.0),
        event_row(
            "delivery_date_change",
            at,
            posting_number="P1",
            old_delivery_end_at=utc("2026-03-05"),
            delivery_end_at=utc("2026-03-07"),
        ),
        event_row(
            "delivery_date_change",
            at,
            posting_number="P1",
            old_delivery_end_at=utc("2026-03-05"),
            delivery_end_at=utc("2026-03-06"),
        ),
    ]
    results = [
        features_at(
            make_tables(
                postings=[posting_row("P1", "2026-03-01")],
                items=[item_row("P1", offer_id="A")],
                events=events,
            ),
            "P1",
            "2026-03-03",
        )
        for events in (rows, rows[::-1])
    ]
    pd.testing.assert_frame_equal(results[0], results[1])
    assert results[0]["delivery_date_changes"].iloc[0] == 2.0


# --- carrier and promise ----------------------------------------------------------------------


def promise_tables() -> HistoryTables:
    return make_tables(
        postings=[
            posting_row(
                "P1",
                "2026-03-01",
                carrier_id=42,
                shipment_deadline_at=utc("2026-03-03"),
                promised_delivery_begin_at=utc("2026-03-07"),
                promised_delivery_end_at=utc("2026-03-08"),  # the final promise, as exported
            ),
            posting_row(
                "P2",
                "2026-03-01",
                carrier_id=7,
                promised_delivery_end_at=utc("2026-03-04"),
            ),
        ],
        events=[
            event_row("state_change", "2026-03-01", posting_number="P1", state="posting_created"),
            event_row(
                "delivery_date_change",
                "2026-03-02",
                posting_number="P1",
                old_delivery_begin_at=utc("2026-03-04"),
                old_delivery_end_at=utc("2026-03-05"),
                delivery_begin_at=utc("2026-03-05"),
                delivery_end_at=utc("2026-03-06"),
            ),
            event_row(
                "delivery_date_change",
                "2026-03-04",
                posting_number="P1",
                old_delivery_begin_at=utc("2026-03-05"),
                old_delivery_end_at=utc("2026-03-06"),
                delivery_begin_at=utc("2026-03-07"),
                delivery_end_at=utc("2026-03-08"),
            ),
        ],
    )


def test_promise_follows_the_date_changes_known_at_as_of() -> None:
    rows = features_at(promise_tables(), "P1", "2026-03-01 12:00", "2026-03-03", "2026-03-09")
    # Before the first change the promise is its old dates; the lead time uses that promise.
    assert rows["carrier"].tolist() == ["42", "42", "42"]
    assert rows["promised_lead_time_hours"].tolist() == [96.0, 96.0, 96.0]
    assert rows["hours_to_shipment_deadline"].tolist() == [36.0, 0.0, -144.0]
    assert rows["hours_to_promised_delivery_end"].tolist() == [84.0, 72.0, -24.0]
    assert rows["delivery_date_changes"].tolist() == [0.0, 1.0, 2.0]
    assert rows["delivery_date_shift_hours"].tolist() == [0.0, 24.0, 72.0]


def test_posting_without_changes_keeps_the_snapshot_promise() -> None:
    row = features_at(promise_tables(), "P2", "2026-03-02").iloc[0]
    assert row["promised_lead_time_hours"] == 72.0
    assert row["hours_to_promised_delivery_end"] == 48.0
    assert row["delivery_date_changes"] == 0.0  # pushes are archived: zero, not unknown


def test_unseen_carrier_is_scored_with_the_global_rate() -> None:
    history = make_tables(
        postings=[
            posting_row("H1", "2026-02-01", carrier_id=1, delivered_at=utc("2026-02-03")),
            posting_row("H2", "2026-02-01", carrier_id=1, cancelled_at=utc("2026-02-02"))
            | {"cancelled_by": "buyer", "status": "cancelled"},
        ],
    )
    aggregates = HistoryAggregates.fit(history, "2026-02-10", prior_strength=4.0)
    tonight = make_tables(postings=[posting_row("N1", "2026-03-01", carrier_id=999)])
    rows = build_features(tonight, "2026-03-02", aggregates=aggregates)
    assert rows.loc["N1", "carrier"] == "999"
    assert rows.loc["N1", "carrier_buyer_cancel_rate"] == pytest.approx(0.5)


# --- timeline ---------------------------------------------------------------------------------


def timeline_tables() -> HistoryTables:
    return make_tables(
        postings=[
            posting_row("P1", "2026-03-01", handed_over_at=utc("2026-03-01 12:00")),
            posting_row("P2", "2026-03-02", handed_over_at=utc("2026-03-04")),
        ],
        events=[
            event_row("carrier_scan", "2026-03-01 18:00", posting_number="P1", state="accepted"),
            event_row("carrier_scan", "2026-03-02 06:00", posting_number="P1", state="sorted"),
            event_row("carrier_scan", "2026-03-05", posting_number="P1", state="arrived"),
            event_row("state_change", "2026-03-02 12:00", posting_number="P1", state="x"),
        ],
    )


def test_timeline_counts_scans_and_silence_up_to_as_of() -> None:
    row = features_at(timeline_tables(), "P1", "2026-03-03").iloc[0]
    assert row["hours_since_order"] == 48.0
    assert row["is_handed_over"] == 1.0
    assert row["hours_since_handover"] == 36.0
    assert row["hours_since_last_activity"] == 12.0  # the state push at 12:00
    assert row["carrier_scans"] == 2.0
    assert row["hours_since_last_scan"] == 18.0


def test_timeline_of_a_quiet_posting_measures_from_the_order() -> None:
    row = features_at(timeline_tables(), "P2", "2026-03-03").iloc[0]
    assert row["is_handed_over"] == 0.0  # handed over only after as_of
    assert np.isnan(row["hours_since_handover"])
    assert row["carrier_scans"] == 0.0
    assert np.isnan(row["hours_since_last_scan"])
    assert row["hours_since_last_activity"] == 24.0


def stage_tables() -> HistoryTables:
    """P1 moves through the substates (with an unknown one and a late, lower one); P2 has only
    a handover time, no pushes of its own."""
    pushes = [
        ("2026-03-01", "posting_created"),
        ("2026-03-01 12:00", "posting_transferring_to_delivery"),
        ("2026-03-02 06:00", "posting_in_carriage"),
        ("2026-03-02 10:00", "posting_some_future_substate"),  # unknown: no stage
        ("2026-03-04", "posting_on_way_to_city"),
        ("2026-03-04 12:00", "posting_in_carriage"),  # out of order: the stage stays
        ("2026-03-06", "posting_in_pickup_point"),
    ]
    return make_tables(
        postings=[
            posting_row("P1", "2026-03-01", handed_over_at=utc("2026-03-01 12:00")),
            posting_row("P2", "2026-03-01", handed_over_at=utc("2026-03-02")),
        ],
        events=[event_row("state_change", at, posting_number="P1", state=s) for at, s in pushes],
    )


def test_delivery_stage_is_the_furthest_substate_known_at_as_of() -> None:
    moments = ["2026-03-01 06:00", "2026-03-02 12:00", "2026-03-05", "2026-03-07"]
    rows = features_at(stage_tables(), "P1", *moments)
    assert rows["delivery_stage"].tolist() == [0.0, 2.0, 3.0, 4.0]
    assert rows["hours_in_delivery_stage"].tolist() == [6.0, 6.0, 24.0, 24.0]


def test_a_known_handover_is_stage_one_from_its_time_without_its_push() -> None:
    rows = features_at(stage_tables(), "P2", "2026-03-01 20:00", "2026-03-03")
    assert rows["delivery_stage"].tolist() == [0.0, 1.0]
    assert rows["hours_in_delivery_stage"].tolist() == [20.0, 24.0]


def test_silent_hours_sum_what_each_gap_since_the_handover_exceeds_two_days() -> None:
    tables = make_tables(
        postings=[
            posting_row("P1", "2026-03-01", handed_over_at=utc("2026-03-01 12:00")),
            posting_row("P2", "2026-03-01", handed_over_at=utc("2026-03-08")),
        ],
        events=[
            event_row("carrier_scan", "2026-03-01 06:00", posting_number="P1"),  # before handover
            event_row("carrier_scan", "2026-03-02", posting_number="P1"),  # gap 12 h
            event_row("carrier_scan", "2026-03-04 12:00", posting_number="P1"),  # gap 60 h: +12
            event_row("state_change", "2026-03-04 12:00", posting_number="P1", state="x"),
            event_row("carrier_scan", "2026-03-05", posting_number="P1"),  # gap 12 h
        ],
    )
    rows = features_at(tables, "P1", "2026-03-01 10:00", "2026-03-04", "2026-03-08 12:00")
    # Before the handover: unknown. On 03-04: the open gap since 03-02 is 48 h, nothing beyond.
    # On 03-08 12:00: 12 h from the 60 h gap, and the open gap of 84 h since 03-05 adds 36 h.
    assert np.isnan(rows["silent_hours_since_handover"].iloc[0])
    assert rows["silent_hours_since_handover"].iloc[1:].tolist() == [0.0, 48.0]
    # A handover without any tracking since counts its whole gap from the handover.
    row = features_at(tables, "P2", "2026-03-11").iloc[0]
    assert row["silent_hours_since_handover"] == 24.0


@st.composite
def delivery_histories(draw: st.DrawFn) -> tuple[HistoryTables, pd.Timestamp, HistoryTables]:
    """A few postings with substate pushes and scans, ``as_of``, and the same history with a
    redrawn future: more pushes and scans after ``as_of``, handovers after ``as_of`` moved."""
    start = utc("2026-03-01")
    as_of = start + draw(st.integers(0, 24 * 20)) * HOUR
    states = [*DELIVERY_STAGES, "posting_delivered", "posting_unknown_substate"]
    postings, events, future_postings, future_events = [], [], [], []
    for number in range(draw(st.integers(1, 4))):
        name = f"P{number}"
        ordered_at = start + draw(st.integers(0, 24 * 10)) * HOUR
        handed = draw(st.one_of(st.none(), st.integers(1, 24 * 5)))
        handed_at = None if handed is None else ordered_at + handed * HOUR
        postings.append(posting_row(name, ordered_at, handed_over_at=handed_at))
        if handed_at is not None and handed_at > as_of:
            handed_at = draw(st.sampled_from([None, as_of + draw(st.integers(1, 48)) * HOUR]))
        future_postings.append(posting_row(name, ordered_at, handed_over_at=handed_at))
        for _ in range(draw(st.integers(0, 6))):
            at = ordered_at + draw(st.integers(0, 24 * 15)) * HOUR
            kind = draw(st.sampled_from(["state_change", "carrier_scan"]))
            row = event_row(kind, at, posting_number=name, state=draw(st.sampled_from(states)))
            if at <= as_of:
                events.append(row)
        for _ in range(draw(st.integers(0, 4))):
            at = as_of + draw(st.integers(1, 24 * 10)) * HOUR
            kind = draw(st.sampled_from(["state_change", "carrier_scan"]))
            future_events.append(
                event_row(kind, at, posting_number=name, state=draw(st.sampled_from(states)))
            )
    return (
        make_tables(postings=postings, events=events),
        as_of,
        make_tables(postings=future_postings, events=events + future_events),
    )


DELIVERY_COLUMNS = ["delivery_stage", "hours_in_delivery_stage", "silent_hours_since_handover"]


@LEAKAGE_SETTINGS
@given(delivery_histories(), st.integers(0, 2**32 - 1))
def test_delivery_stage_and_silence_never_see_after_as_of_nor_row_order(
    history: tuple[HistoryTables, pd.Timestamp, HistoryTables], seed: int
) -> None:
    tables, as_of, with_future = history
    moments = moments_before(tables, as_of)
    expected = build_feature_rows(tables, moments)[DELIVERY_COLUMNS]
    pd.testing.assert_frame_equal(
        build_feature_rows(with_future, moments)[DELIVERY_COLUMNS], expected
    )
    shuffled = HistoryTables(
        postings=with_future.postings.sample(frac=1.0, random_state=seed).reset_index(drop=True),
        items=with_future.items,
        events=with_future.events.sample(frac=1.0, random_state=seed).reset_index(drop=True),
        products=with_future.products,
        rejects=with_future.rejects,
    )
    pd.testing.assert_frame_equal(build_feature_rows(shuffled, moments)[DELIVERY_COLUMNS], expected)


# --- listing ----------------------------------------------------------------------------------


def test_listing_counts_card_edits_of_the_offers_after_purchase() -> None:
    tables = make_tables(
        postings=[posting_row("P1", "2026-03-01")],
        items=[item_row("P1", offer_id="A"), item_row("P1", line_no=1, offer_id="B")],
        events=[
            event_row("card_edit", "2026-02-28", offer_id="A"),  # before purchase
            event_row("card_edit", "2026-03-01 12:00", offer_id="A"),
            event_row("card_edit", "2026-03-02", offer_id="B"),
            event_row("card_edit", "2026-03-02", offer_id="C"),  # another offer
            event_row("card_edit", "2026-03-04", offer_id="B"),  # after as_of
        ],
    )
    row = features_at(tables, "P1", "2026-03-03").iloc[0]
    assert row["card_edits_since_purchase"] == 2.0
    assert row["hours_since_last_card_edit"] == 24.0


# --- buyer and order --------------------------------------------------------------------------


def test_buyer_and_order_attributes_value_in_rub_and_buyer_history() -> None:
    buyer = {"customer_id": 7}
    tables = make_tables(
        postings=[
            posting_row(
                "P1",
                "2026-03-01",
                region="Kazan",
                payment_type="on_delivery",
                delivery_type="PVZ",
                is_premium=True,
                is_legal=False,
                **buyer,
            ),
            posting_row("E1", "2026-02-01", status="cancelled", cancelled_by="buyer")
            | {"cancelled_at": utc("2026-02-02"), **buyer},
            posting_row("E2", "2026-02-10", delivered_at=utc("2026-02-15"), **buyer),
            posting_row("E3", "2026-03-02", cancelled_by="buyer", **buyer)
            | {"cancelled_at": utc("2026-03-02 12:00"), "status": "cancelled"},
            posting_row("E4", "2026-03-02", cancelled_by="buyer", **buyer)
            | {"cancelled_at": utc("2026-03-05"), "status": "cancelled"},  # after as_of
            posting_row("X1", "2026-03-01", customer_id=8),
        ],
        items=[
            item_row("P1", quantity=2, unit_price=100.0, currency_code="CNY"),
            item_row("P1", line_no=1, quantity=1, unit_price=500.0, currency_code="RUB"),
            item_row("X1", quantity=1, unit_price=10.0, currency_code="XYZ"),
        ],
    )
    row = features_at(tables, "P1", "2026-03-03").iloc[0]
    assert (row["region"], row["payment_type"], row["delivery_type"]) == (
        "Kazan",
        "on_delivery",
        "PVZ",
    )
    assert (row["is_premium"], row["is_legal"]) == (1.0, 0.0)
    assert (row["total_quantity"], row["product_lines"]) == (3.0, 2.0)
    assert row["order_value_rub"] == pytest.approx(2 * 100 * 11.5 + 500)
    assert row["buyer_earlier_postings"] == 2.0  # E1, E2 ordered before P1
    assert row["buyer_earlier_buyer_cancels"] == 2.0  # E1, E3 cancelled by as_of; E4 later
    other = features_at(tables, "X1", "2026-03-03").iloc[0]
    assert np.isnan(other["order_value_rub"])  # unknown currency
    assert other["buyer_earlier_postings"] == 0.0


# --- history rates ----------------------------------------------------------------------------


def resolved(number: str, day: str, outcome: str, **fields: object) -> dict:
    """A posting ordered a few days before ``day`` that ended on ``day`` with ``outcome``."""
    ordered_at = utc(day) - 72 * HOUR
    if outcome == "delivered":
        return posting_row(number, ordered_at, status="delivered", delivered_at=utc(day), **fields)
    return posting_row(
        number,
        ordered_at,
        status="cancelled",
        cancelled_by=outcome,
        cancelled_at=utc(day) if day else None,
        **fields,
    )


def rates_tables() -> HistoryTables:
    moscow, kazan = {"region": "Moscow"}, {"region": "Kazan"}
    postings = [
        resolved("R1", "2026-02-05", "buyer", carrier_id=1, **moscow),
        resolved("R2", "2026-02-06", "buyer", carrier_id=1, **moscow),
        resolved("R3", "2026-02-07", "delivered", carrier_id=1, **kazan),
        resolved("R4", "2026-02-08", "delivered", carrier_id=1, **kazan),
        resolved("R5", "2026-02-09", "delivered", carrier_id=2, **kazan),
        resolved("S1", "2026-02-10", "seller", carrier_id=1, **moscow),  # counts as neither
        resolved("L1", "2026-03-05", "delivered", carrier_id=1, **moscow),  # after as_of
        posting_row("U1", "2026-02-01", status="cancelled", cancelled_by="buyer", carrier_id=1),
        posting_row("P1", "2026-03-01", carrier_id=1, **moscow),
        posting_row("P2", "2026-03-01", carrier_id=9),
    ]
    sku = {"R1": 10, "R2": 10, "R3": 20, "R4": 20, "R5": 10, "S1": 10, "L1": 20, "U1": 10}
    items = [item_row(number, sku=s, unit_price=1000.0) for number, s in sku.items()]
    items += [
        item_row("P1", sku=10, unit_price=1000.0),
        item_row("P1", line_no=1, sku=20, unit_price=1000.0, quantity=3),
    ]
    return make_tables(postings=postings, items=items)


def test_history_rates_smooth_buyer_cancellations_towards_the_global_rate() -> None:
    tables = rates_tables()
    aggregates = HistoryAggregates.fit(tables, "2026-03-03", prior_strength=5.0)
    rows = build_feature_rows(
        tables,
        pd.DataFrame({"posting_number": ["P1", "P2"], "as_of": utc("2026-03-03")}),
        aggregates,
    )
    # Resolved by as_of: 2 buyer cancellations, 3 deliveries -> global 0.4, prior 5 postings.
    p1, p2 = rows.iloc[0], rows.iloc[1]
    assert p1["carrier_buyer_cancel_rate"] == pytest.approx((2 + 5 * 0.4) / (4 + 5))
    assert p1["region_buyer_cancel_rate"] == pytest.approx((2 + 5 * 0.4) / (2 + 5))
    sku_10 = (2 + 5 * 0.4) / (3 + 5)
    sku_20 = (0 + 5 * 0.4) / (2 + 5)
    assert p1["sku_buyer_cancel_rate"] == pytest.approx((sku_10 * 1000 + sku_20 * 3000) / 4000)
    assert p2["carrier_buyer_cancel_rate"] == pytest.approx(0.4)  # unseen carrier
    assert p2["region_buyer_cancel_rate"] == pytest.approx(0.4)  # no region
    assert np.isnan(p2["sku_buyer_cancel_rate"])  # no lines


def test_history_rates_at_an_earlier_moment_use_what_was_resolved_then() -> None:
    tables = rates_tables()
    aggregates = HistoryAggregates.fit(tables, "2026-03-03", prior_strength=5.0)
    early = pd.DataFrame({"posting_number": ["P1"], "as_of": [utc("2026-02-06 12:00")]})
    row = build_feature_rows(tables, early, aggregates).iloc[0]
    # Only R1 and R2 (both buyer cancellations) were resolved: global rate 1.
    assert row["carrier_buyer_cancel_rate"] == pytest.approx(1.0)
    refit = HistoryAggregates.fit(tables, "2026-02-06 12:00", prior_strength=5.0)
    assert build_feature_rows(tables, early, refit).equals(
        build_feature_rows(tables, early, aggregates)
    )


# --- missing inputs ---------------------------------------------------------------------------


def test_missing_side_files_give_missing_families_not_errors() -> None:
    tables = make_tables(
        postings=[posting_row("P1", "2026-03-01", carrier_id=3, handed_over_at=utc("2026-03-02"))],
        items=[item_row("P1")],
    )
    row = build_features(tables, "2026-03-03").loc["P1"]
    unknown = [
        *FEATURE_FAMILIES["price_since_purchase"],
        *FEATURE_FAMILIES["listing"],
        "delivery_date_changes",
        "delivery_date_shift_hours",
        "hours_since_last_activity",
        "carrier_scans",
        "hours_since_last_scan",
        *DELIVERY_COLUMNS,
    ]
    assert row[unknown].isna().all()
    assert row["hours_since_order"] == 48.0
    assert row["hours_since_handover"] == 24.0


def test_postings_without_items_or_events_still_get_features() -> None:
    tables = make_tables(postings=[posting_row("P1", "2026-03-01")])
    row = build_features(tables, "2026-03-02").loc["P1"]
    assert row["product_lines"] == 0.0
    assert np.isnan(row["total_quantity"])
    assert np.isnan(row["order_value_rub"])


def test_counts_are_unknown_before_the_seller_started_collecting_them() -> None:
    tables = make_tables(
        postings=[posting_row("P1", "2026-03-01"), posting_row("P2", "2026-03-01")],
        events=[
            event_row("carrier_scan", "2026-03-05", posting_number="P2"),
            event_row("state_change", "2026-03-05", posting_number="P2"),
        ],
    )
    rows = features_at(tables, "P1", "2026-03-04", "2026-03-06")
    assert rows["carrier_scans"].isna().tolist() == [True, False]
    assert rows["carrier_scans"].iloc[1] == 0.0
    assert rows["card_edits_since_purchase"].isna().tolist() == [True, False]


def test_unknown_posting_gets_missing_features() -> None:
    tables = make_tables(postings=[posting_row("P1", "2026-03-01")])
    rows = features_at(tables, "NOPE", "2026-03-02")
    assert rows.iloc[0].isna().all()


def test_empty_moments_give_an_empty_frame_with_the_columns() -> None:
    tables = make_tables(postings=[posting_row("P1", "2026-03-01")])
    rows = build_features(tables, "2026-02-01")
    assert rows.empty
    assert list(rows.columns) == FEATURE_COLUMNS


# --- open postings ----------------------------------------------------------------------------


def test_open_postings_exclude_closed_unordered_and_unplaceable() -> None:
    tables = make_tables(
        postings=[
            posting_row("OPEN", "2026-03-01"),
            posting_row("LATER_DELIVERED", "2026-03-01", delivered_at=utc("2026-03-05")),
            posting_row("DELIVERED", "2026-03-01", delivered_at=utc("2026-03-02")),
            posting_row("CANCELLED", "2026-03-01", cancelled_at=utc("2026-03-03")),
            posting_row("NOT_YET", "2026-03-04"),
            posting_row("UNTIMED", "2026-03-01", status="cancelled"),
        ],
    )
    assert list(open_postings_at(tables, "2026-03-03")) == ["LATER_DELIVERED", "OPEN"]


# --- properties -------------------------------------------------------------------------------


@LEAKAGE_SETTINGS
@given(st.data())
def test_rewriting_the_future_after_as_of_never_changes_a_feature(data: st.DataObject) -> None:
    tables, as_of = data.draw(random_histories())
    other = data.draw(rewritten_futures(tables, as_of))
    moments = moments_before(tables, as_of)
    # Aggregates fitted on each history at as_of: the future must not reach them either.
    pd.testing.assert_frame_equal(
        build_feature_rows(other, moments, HistoryAggregates.fit(other, as_of)),
        build_feature_rows(tables, moments, HistoryAggregates.fit(tables, as_of)),
    )
    pd.testing.assert_frame_equal(build_features(other, as_of), build_features(tables, as_of))


@PROPERTY_SETTINGS
@given(st.data())
def test_shuffling_the_rows_of_every_table_never_changes_a_feature(data: st.DataObject) -> None:
    tables, as_of = data.draw(random_histories())
    seed = data.draw(st.integers(0, 2**32 - 1))

    def shuffled(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)

    other = HistoryTables(
        postings=shuffled(tables.postings),
        items=shuffled(tables.items),
        events=shuffled(tables.events),
        products=tables.products,
        rejects=tables.rejects,
    )
    moments = moments_before(tables, as_of)
    pd.testing.assert_frame_equal(
        build_feature_rows(other, moments), build_feature_rows(tables, moments)
    )


@PROPERTY_SETTINGS
@given(random_histories())
def test_build_features_is_build_feature_rows_on_the_open_postings(
    history: tuple[HistoryTables, pd.Timestamp],
) -> None:
    tables, as_of = history
    features = build_features(tables, as_of)
    moments = pd.DataFrame({"posting_number": features.index.to_numpy(), "as_of": as_of})
    rows = build_feature_rows(tables, moments)
    rows.index = features.index
    pd.testing.assert_frame_equal(rows, features)
