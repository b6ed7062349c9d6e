"""The key primitives of the feature definition give the same codes by both of their ways.

Few keys (a REST request's posting) are coded with Python dicts, many (a shop's history) with
pandas' and Arrow's hashing; the features read them interchangeably, so they must agree on
every input, in both representations the history columns hold keys in (a table's pandas array,
a request's object array with None).
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

import core.point_in_time as point_in_time
from core.columns import map_keys, sort_codes
from core.features import RUB_PER_UNIT
from core.features.families import _encode_sorted
from core.point_in_time import encode_keys, positions_of

TEXT_KEYS = st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "B", "ä", "10", "9", ""])))
INT_KEYS = st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)))


@contextmanager
def _large_path():
    with mock.patch.object(point_in_time, "SMALL_KEYS", -1):
        yield


def _object(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _both_representations(values: list, dtype: str) -> list:
    return [_object(values), pd.array(values, dtype=dtype)]


def _pairs(table: list, query: list, dtype: str) -> list:
    """(table, query) in a request's representation, then in a table's."""
    return list(
        zip(_both_representations(table, dtype), _both_representations(query, dtype), strict=True)
    )


def _same(call, *columns) -> None:
    small = call(*columns)
    with _large_path():
        large = call(*columns)
    if isinstance(small, tuple):
        for a, b in zip(small, large, strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_array_equal(small, large)


@settings(max_examples=150, deadline=None)
@given(table=TEXT_KEYS, query=TEXT_KEYS)
def test_text_key_codes_agree(table: list, query: list) -> None:
    for t, q in _pairs(table, query, "string"):
        _same(encode_keys, t, q)
        _same(_encode_sorted, t, q)
        _same(sort_codes, t)
        _same(lambda v: map_keys(v, RUB_PER_UNIT), t)


@settings(max_examples=150, deadline=None)
@given(table=INT_KEYS, query=INT_KEYS)
def test_integer_key_codes_agree(table: list, query: list) -> None:
    for t, q in _pairs(table, query, "Int64"):
        _same(encode_keys, t, q)
        _same(sort_codes, t)


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(st.sampled_from(["p1", "p2", "P1", "3", "é"]), unique=True), query=TEXT_KEYS)
def test_positions_agree(keys: list, query: list) -> None:
    for k, q in _pairs(keys, query, "string"):
        _same(positions_of, k, q)


def test_a_request_and_a_table_code_the_same_keys_alike() -> None:
    values = ["b", None, "a", "b"]
    np.testing.assert_array_equal(
        sort_codes(_object(values)), sort_codes(pd.array(values, dtype="string"))
    )
    np.testing.assert_array_equal(sort_codes(_object(values)), [1, 2, 0, 1])
