"""Column converters: timestamps, decimals, ids and text, including the values that fail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pandas as pd
from hypothesis import given
from hypothesis import strategies as st

from core.ingest.values import (
    build_cabinet_timestamps,
    build_decimals,
    build_integers,
    build_strings,
    build_utc_timestamps,
)


def test_iso_timestamps_with_z_offsets_and_fractions_become_utc() -> None:
    parsed, bad = build_utc_timestamps(
        [
            "2022-05-13T07:07:32Z",
            "2021-09-01T00:23:45.607000Z",
            "2026-04-14T19:01:23+03:00",
            "2026-04-14T19:01:23",
        ]
    )
    assert str(parsed.dtype) == "datetime64[ns, UTC]"
    assert parsed.tolist() == [
        pd.Timestamp("2022-05-13T07:07:32Z"),
        pd.Timestamp("2021-09-01T00:23:45.607Z"),
        pd.Timestamp("2026-04-14T16:01:23Z"),
        pd.Timestamp("2026-04-14T19:01:23Z"),
    ]
    assert not bad.any()


def test_absent_timestamps_are_not_bad_but_unreadable_ones_are() -> None:
    parsed, bad = build_utc_timestamps([None, "", "tomorrow", 1700000000, "9999-01-01T00:00:00Z"])
    assert parsed.isna().all()
    assert bad.tolist() == [False, False, True, True, True]


@given(
    moment=st.datetimes(
        min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    offset_minutes=st.integers(min_value=-12 * 60, max_value=14 * 60),
    with_micros=st.booleans(),
    zulu=st.booleans(),
)
def test_any_iso_spelling_of_an_instant_parses_to_that_instant(
    moment: datetime, offset_minutes: int, with_micros: bool, zulu: bool
) -> None:
    if not with_micros:
        moment = moment.replace(microsecond=0)
    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    text = local.isoformat()
    if zulu and offset_minutes == 0:
        text = text.replace("+00:00", "Z")
    parsed, bad = build_utc_timestamps([text])
    assert not bad[0]
    assert parsed[0] == pd.Timestamp(moment)


def test_cabinet_dates_in_both_formats_are_moscow_time() -> None:
    parsed, bad = build_cabinet_timestamps(
        ["2026-04-14 19:01:23", "14.04.2026 19:01", "", "когда-нибудь"]
    )
    assert parsed[0] == pd.Timestamp("2026-04-14T16:01:23Z")
    assert parsed[1] == pd.Timestamp("2026-04-14T16:01:00Z")
    assert pd.isna(parsed[2]) and pd.isna(parsed[3])
    assert bad.tolist() == [False, False, False, True]


def test_decimals_from_strings_numbers_and_comma_notation() -> None:
    numbers, bad = build_decimals(["1390.000000", 81, 250.5, "1 390,50", "89,9", None, "", "abc"])
    assert numbers[:5].tolist() == [1390.0, 81.0, 250.5, 1390.5, 89.9]
    assert numbers[5:].isna().all()
    assert bad.tolist() == [False] * 7 + [True]


def test_booleans_and_containers_are_not_numbers() -> None:
    _, bad = build_decimals([True, {"value": 1}, [1]])
    assert bad.all()


@given(
    value=st.decimals(min_value=0, max_value=10**9, places=2, allow_nan=False),
    comma=st.booleans(),
)
def test_decimal_text_round_trips(value, comma: bool) -> None:
    text = f"{value:.2f}"
    if comma:
        text = text.replace(".", ",")
    numbers, bad = build_decimals([text])
    assert not bad[0]
    assert numbers[0] == float(value)


def test_integers_keep_big_ids_exact_and_mark_non_integers() -> None:
    ids, bad = build_integers([21321684811000, "358924380", "123456789012345678", 2.0, 1.5, "x"])
    assert ids[:4].tolist() == [21321684811000, 358924380, 123456789012345678, 2]
    assert ids[4:].isna().all()
    assert bad.tolist() == [False, False, False, False, True, True]


def test_strings_are_trimmed_and_empty_means_missing() -> None:
    text = build_strings([" Электронный конструктор", "蓝牙耳机", "", None, 700001, {"a": 1}])
    assert text.tolist()[:2] == ["Электронный конструктор", "蓝牙耳机"]
    assert text[2:4].isna().all()
    assert text[4] == "700001"
    assert pd.isna(text[5])
    assert str(text.dtype) == "string"


def test_converters_accept_object_arrays() -> None:
    values = np.array(["2026-04-10T08:15:00Z", None], dtype=object)
    parsed, bad = build_utc_timestamps(values)
    assert parsed[0] == pd.Timestamp("2026-04-10T08:15:00Z") and pd.isna(parsed[1])
    assert not bad.any()
