"""Labels: buyer cancellations are positive, deliveries negative, the rest excluded or censored."""

from __future__ import annotations

import pandas as pd
from hypothesis import HealthCheck, given, settings
from tables_factory import make_tables, posting_row, random_histories, utc

from core.tables import HistoryTables
from training.labels import (
    CANCELLED_BY_UNKNOWN,
    CANCELLED_NOT_BY_BUYER,
    CENSORED,
    CLOSED_BEFORE,
    CLOSING_TIME_UNKNOWN,
    EXCLUSION_REASONS,
    NOT_ORDERED_YET,
    UNKNOWN_POSTING,
    build_labels,
    label_exclusion_reasons,
)

ORDERED = "2026-03-01"
AS_OF = utc("2026-03-03")


def cancelled(number: str, by: str | None, at: str | None = "2026-03-05") -> dict:
    return posting_row(
        number,
        ORDERED,
        status="cancelled",
        cancelled_by=by,
        cancelled_at=utc(at) if at else None,
    )


def outcomes() -> HistoryTables:
    return make_tables(
        postings=[
            cancelled("BUYER", "buyer"),
            posting_row("DELIVERED", ORDERED, status="delivered", delivered_at=utc("2026-03-06")),
            cancelled("SELLER", "seller"),
            cancelled("OZON", "ozon"),
            cancelled("SYSTEM", "system"),
            cancelled("CARRIER", "delivery"),
            cancelled("WHO", "unknown"),
            cancelled("NOBODY_SAID", None),
            posting_row("STILL_OPEN", ORDERED, status="delivering"),
            posting_row("DONE_BEFORE", ORDERED, status="delivered", delivered_at=utc("2026-03-02")),
            cancelled("UNTIMED", "buyer", at=None),
            posting_row("FUTURE", "2026-03-04"),
        ]
    )


def at_as_of(tables: HistoryTables, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    numbers = [*tables.postings["posting_number"], *extra]
    return pd.DataFrame({"posting_number": numbers, "as_of": AS_OF})


def test_each_ending_gets_its_label_or_its_reason() -> None:
    tables = outcomes()
    moments = at_as_of(tables, extra=("MISSING",))
    labels = build_labels(tables, moments)
    reasons = label_exclusion_reasons(tables, moments)
    by_posting = dict(
        zip(moments["posting_number"], zip(labels, reasons, strict=True), strict=True)
    )
    assert by_posting["BUYER"] == (1, pd.NA)
    assert by_posting["DELIVERED"] == (0, pd.NA)
    for number in ("SELLER", "OZON", "SYSTEM", "CARRIER"):
        assert by_posting[number] == (pd.NA, CANCELLED_NOT_BY_BUYER), number
    assert by_posting["WHO"] == (pd.NA, CANCELLED_BY_UNKNOWN)
    assert by_posting["NOBODY_SAID"] == (pd.NA, CANCELLED_BY_UNKNOWN)
    assert by_posting["STILL_OPEN"] == (pd.NA, CENSORED)
    assert by_posting["DONE_BEFORE"] == (pd.NA, CLOSED_BEFORE)
    assert by_posting["UNTIMED"] == (pd.NA, CLOSING_TIME_UNKNOWN)
    assert by_posting["FUTURE"] == (pd.NA, NOT_ORDERED_YET)
    assert by_posting["MISSING"] == (pd.NA, UNKNOWN_POSTING)
    assert labels.dtype == "Int8"


def test_a_buyer_cancellation_at_as_of_itself_is_already_known() -> None:
    tables = make_tables(postings=[cancelled("P", "buyer", at="2026-03-03")])
    labels = build_labels(tables, at_as_of(tables))
    assert labels.isna().all()


def test_labels_keep_the_moments_index() -> None:
    tables = outcomes()
    moments = at_as_of(tables).set_index(pd.Index(range(100, 100 + len(tables.postings))))
    assert build_labels(tables, moments).index.equals(moments.index)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_histories())
def test_labels_never_learn_other_cancellations_and_never_call_open_postings_negative(
    history: tuple[HistoryTables, pd.Timestamp],
) -> None:
    tables, as_of = history
    postings = tables.postings
    moments = pd.DataFrame({"posting_number": postings["posting_number"], "as_of": as_of})
    labels = build_labels(tables, moments)
    reasons = label_exclusion_reasons(tables, moments)

    assert labels.isna().equals(reasons.notna())
    assert set(labels.dropna()) <= {0, 1}
    assert set(reasons.dropna()) <= set(EXCLUSION_REASONS)
    positive = labels.eq(1).to_numpy(dtype=bool, na_value=False)
    negative = labels.eq(0).to_numpy(dtype=bool, na_value=False)
    assert (postings.loc[positive, "cancelled_by"] == "buyer").all()
    assert (postings.loc[positive, "cancelled_at"] > as_of).all()
    # A negative was delivered after as_of; a posting never delivered is never a negative.
    assert (postings.loc[negative, "delivered_at"] > as_of).all()
    not_buyer = postings["cancelled_by"].ne("buyer").to_numpy(dtype=bool, na_value=True)
    never_delivered = postings["delivered_at"].isna().to_numpy()
    assert not (positive & not_buyer).any()
    # Cancelled after as_of by someone other than the buyer: left out, whatever else holds.
    other_cancel_later = (
        postings["cancelled_by"]
        .isin(["seller", "ozon", "system", "delivery"])
        .to_numpy(bool, na_value=False)
        & (postings["cancelled_at"] > as_of).to_numpy(bool, na_value=False)
        & never_delivered
        & (postings["ordered_at"] <= as_of).to_numpy()
    )
    assert (reasons[other_cancel_later] == CANCELLED_NOT_BY_BUYER).all()
    terminal = (
        postings["status"].isin(["cancelled", "delivered"]).to_numpy(dtype=bool, na_value=False)
    )
    still_open = (
        postings["cancelled_at"].isna().to_numpy()
        & never_delivered
        & (postings["ordered_at"] <= as_of).to_numpy()
        & ~terminal
    )
    assert (reasons[still_open] == CENSORED).all()
