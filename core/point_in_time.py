"""Point-in-time primitives: timestamps as int64 nanoseconds, "the latest row of each key at t",
keys coded for one posting or a million, and the small vectorised helpers every feature uses.

Each primitive that has two or three algorithms (few inputs in Python dicts or broadcast
comparisons, many in pandas' or Arrow's kernels) gives the same answers by each; the switch-over
sizes are module constants, measured by ``python -m benchmarks.routes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.tables import UTC_TS

NAT_NS = np.iinfo(np.int64).min  # how NaT looks as int64 nanoseconds
NS_PER_HOUR = 3_600_000_000_000


# --- point-in-time primitives ---------------------------------------------------------------


def to_utc(value: pd.Timestamp | str) -> pd.Timestamp:
    """One moment as a UTC-aware nanosecond timestamp; a naive value is taken as UTC."""
    stamp = pd.Timestamp(value)
    if pd.isna(stamp):
        raise ValueError("a moment (as_of) must be a timestamp, not NaT")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.as_unit("ns")


def to_ns(values: pd.Series | pd.Index) -> np.ndarray:
    """Timestamps as int64 UTC nanoseconds since the epoch (naive = UTC); NaT is :data:`NAT_NS`.

    For a column already in the canonical dtype this is a view, not a copy: do not write to it.
    """
    stamps = values if isinstance(values, pd.Series) else pd.Series(values)
    if not isinstance(stamps.dtype, pd.DatetimeTZDtype):
        stamps = pd.to_datetime(stamps, utc=True)
    if stamps.dtype != UTC_TS:
        stamps = stamps.dt.tz_convert("UTC").astype(UTC_TS)
    return stamps.array.asi8


def from_ns(values: np.ndarray) -> pd.Series:
    """Inverse of :func:`to_ns`: int64 nanoseconds (NaT as :data:`NAT_NS`) to UTC timestamps."""
    return pd.Series(np.asarray(values, dtype="int64").view("datetime64[ns]")).dt.tz_localize("UTC")


# Up to this many keys a call codes them with a Python dict: pandas' and Arrow's hashing cost
# tens of microseconds per call whatever the size, which is what the one posting of a REST
# request would pay on every call. Both ways give the same codes (tests/test_aggregates.py).
SMALL_KEYS = 512


def plain_keys(values: Any) -> list[Any] | None:
    """Few keys as Python values (``None`` where missing); None when there are more than
    :data:`SMALL_KEYS`."""
    if len(values) > SMALL_KEYS:
        return None
    listed = values.tolist() if hasattr(values, "tolist") else list(values)
    return [None if v is None or v is pd.NA or v != v else v for v in listed]


def encode_keys(table_keys: Any, query_keys: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for two key columns on one shared scale; missing keys get -1.

    Codes follow the first appearance of each key, table first. ``merge_asof`` compares ``by``
    keys fastest as integers, and strings from different tables must map to the same code.
    """
    table_plain, query_plain = plain_keys(table_keys), plain_keys(query_keys)
    if table_plain is not None and query_plain is not None:
        code_of: dict[Any, int] = {}
        for key in table_plain + query_plain:
            if key is not None and key not in code_of:
                code_of[key] = len(code_of)
        table_codes = [-1 if key is None else code_of[key] for key in table_plain]
        query_codes = [-1 if key is None else code_of[key] for key in query_plain]
        return np.array(table_codes, dtype="int64"), np.array(query_codes, dtype="int64")
    table = pd.Series(table_keys, copy=False).reset_index(drop=True)
    query = pd.Series(query_keys, copy=False).reset_index(drop=True)
    if table.dtype != query.dtype:
        query = query.astype(table.dtype)
    codes, _ = pd.factorize(pd.concat([table, query], ignore_index=True), use_na_sentinel=True)
    codes = codes.astype("int64")
    return codes[: len(table)], codes[len(table) :]


# Below this many table rows plus queries, sorting and binary search in numpy cost less than
# merge_asof's fixed cost (a few milliseconds); above it merge_asof's linear merge wins (for a
# million queries it is several times faster). Both give the same positions.
SMALL_LOOKUP_SIZE = 15_000


def latest_row(
    table_keys: np.ndarray,
    table_ns: np.ndarray,
    query_keys: np.ndarray,
    query_ns: np.ndarray,
    *,
    strictly_before: bool = False,
) -> np.ndarray:
    """For each query (key, t), the position of the table's latest row of that key at ``t``.

    "Latest at t" is ``at <= t`` (``at < t`` with ``strictly_before``). Among rows of one key
    with equal times the one at the highest position wins, so callers order their table so that
    the row that should win comes last. Returns positions into the table, -1 where no row
    qualifies (unknown key, missing key or time, nothing early enough).
    """
    table_keys = np.asarray(table_keys, dtype="int64")
    table_ns = np.asarray(table_ns, dtype="int64")
    query_keys = np.asarray(query_keys, dtype="int64")
    query_ns = np.asarray(query_ns, dtype="int64")
    if len(table_keys) * len(query_keys) <= TINY_LOOKUP_PAIRS:
        return latest_by_comparison(
            table_keys, table_ns, query_keys, query_ns, strictly_before=strictly_before
        )
    if len(table_keys) + len(query_keys) <= SMALL_LOOKUP_SIZE:
        index = PointInTimeIndex(table_keys, table_ns)
        return index.latest(query_keys, query_ns, strictly_before=strictly_before)
    result = np.full(len(query_ns), -1, dtype="int64")
    usable = np.flatnonzero((table_keys >= 0) & (table_ns != NAT_NS))
    asked = np.flatnonzero((query_keys >= 0) & (query_ns != NAT_NS))
    if len(usable) == 0 or len(asked) == 0:
        return result
    # merge_asof needs both sides sorted on time; a stable sort keeps the callers' tie order.
    right_order = usable[np.argsort(table_ns[usable], kind="stable")]
    right = pd.DataFrame(
        {"key": table_keys[right_order], "at": table_ns[right_order], "row": right_order}
    )
    left_order = asked[np.argsort(query_ns[asked], kind="stable")]
    left = pd.DataFrame({"key": query_keys[left_order], "at": query_ns[left_order]})
    merged = pd.merge_asof(
        left,
        right,
        on="at",
        by="key",
        direction="backward",
        allow_exact_matches=not strictly_before,
    )
    rows = merged["row"].to_numpy(dtype="float64", na_value=np.nan)
    result[left_order] = np.where(np.isnan(rows), -1, rows).astype("int64")
    return result


# Up to this many (table row, query) pairs every query is compared with every row at once: fewer
# numpy calls than sorting, which is what the few events of one posting pay for each lookup.
TINY_LOOKUP_PAIRS = 4_096


def latest_by_comparison(
    table_keys: np.ndarray,
    table_ns: np.ndarray,
    query_keys: np.ndarray,
    query_ns: np.ndarray,
    *,
    strictly_before: bool = False,
) -> np.ndarray:
    """:func:`latest_row` by comparing every query with every row (for tiny inputs).

    Rows are ranked by (time, position); the qualifying row of highest rank is the latest, the
    one at the highest position among equal times.
    """
    n = len(table_keys)
    if n == 0 or len(query_keys) == 0:
        return np.full(len(query_keys), -1, dtype="int64")
    order = np.lexsort((np.arange(n), table_ns))
    rank = np.empty(n, dtype="int64")
    rank[order] = np.arange(n)
    usable = (table_keys >= 0) & (table_ns != NAT_NS)
    if strictly_before:
        early = table_ns[None, :] < query_ns[:, None]
    else:
        early = table_ns[None, :] <= query_ns[:, None]
    qualifies = early & (table_keys[None, :] == query_keys[:, None]) & usable[None, :]
    best = np.where(qualifies, rank[None, :], -1).max(axis=1)
    return np.where(best >= 0, order[np.maximum(best, 0)], -1)


class PointInTimeIndex:
    """A table of (key code, time) rows sorted once for any number of "latest row at t" queries.

    The rule of :func:`latest_row`. Each row gets one sortable integer, ``key * (T + 1) +
    rank``, where ``rank`` counts the table's distinct times at or before the row's time; a query
    (k, t) gets ``k * (T + 1)`` plus the number of distinct times at or before ``t`` (before it,
    with ``strictly_before``), so the latest qualifying row is the last one not above the query's
    number, provided it has the query's key. A handful of numpy calls whatever the sizes: what
    one REST request pays for its few events, and what a model's history aggregates keep ready.
    """

    def __init__(self, table_keys: np.ndarray, table_ns: np.ndarray) -> None:
        table_keys = np.asarray(table_keys, dtype="int64")
        table_ns = np.asarray(table_ns, dtype="int64")
        usable = np.flatnonzero((table_keys >= 0) & (table_ns != NAT_NS))
        keys, at = table_keys[usable], table_ns[usable]
        self.times = np.unique(at)
        self.stride = len(self.times) + 1
        number = keys * self.stride + np.searchsorted(self.times, at, side="right")
        # Stable: among equal (key, time) the row at the highest position comes last and wins.
        order = np.argsort(number, kind="stable")
        self.numbers = number[order]
        self.keys = keys[order]
        self.rows = usable[order]

    def latest(
        self, query_keys: np.ndarray, query_ns: np.ndarray, *, strictly_before: bool = False
    ) -> np.ndarray:
        """Table positions of the latest row of each query's key at its time; -1 for none."""
        query_keys = np.asarray(query_keys, dtype="int64")
        query_ns = np.asarray(query_ns, dtype="int64")
        if len(self.rows) == 0:
            return np.full(len(query_keys), -1, dtype="int64")
        side = "left" if strictly_before else "right"
        earlier_times = np.searchsorted(self.times, query_ns, side=side)
        found = np.searchsorted(self.numbers, query_keys * self.stride + earlier_times, "right")
        found -= 1
        # A missing key (-1), a missing time (no earlier times) or nothing early enough all land
        # on a row of another key, or before the first row.
        at = np.maximum(found, 0)
        return np.where((found >= 0) & (self.keys[at] == query_keys), self.rows[at], -1)


def positions_of(keys: Any, queries: Any) -> np.ndarray:
    """The position of each query among ``keys`` (unique strings), -1 when absent or missing.

    What ``pd.Index(keys).get_indexer(queries)`` gives, hashed by Arrow: about five times
    faster on the millions of posting numbers of events and items; few keys take a dict.
    """
    small_keys, small_queries = plain_keys(keys), plain_keys(queries)
    if small_keys is not None and small_queries is not None:
        position: dict[str, int] = {}
        for i, key in enumerate(small_keys):
            if key is not None:
                position.setdefault(str(key), i)
        found = [-1 if q is None else position.get(str(q), -1) for q in small_queries]
        return np.array(found, dtype="int64")
    value_set = _arrow_strings(keys)
    found = pc.index_in(_arrow_strings(queries).cast(value_set.type), value_set=value_set)
    return found.fill_null(-1).to_numpy().astype("int64")


def _arrow_strings(values: Any) -> pa.Array:
    array = pa.array(pd.Series(values, copy=False).astype("string").array)
    return array if isinstance(array, pa.Array) else array.combine_chunks()


def first_event_ns(
    events: pd.DataFrame, kinds: tuple[str, ...], until_ns: int | None = None
) -> int:
    """The earliest time of any event of ``kinds`` (at or before ``until_ns``); NaT for none."""
    chosen = events["kind"].isin(kinds).to_numpy(dtype=bool, na_value=False)
    at = to_ns(events.loc[chosen, "at"])
    at = at[at != NAT_NS]
    if until_ns is not None:
        at = at[at <= until_ns]
    return int(at.min()) if len(at) else NAT_NS


def earliest_ns(*moments: int) -> int:
    """The earliest of moments in int64 ns, NaT (unknown) only when all are."""
    known = [moment for moment in moments if moment != NAT_NS]
    return min(known) if known else NAT_NS


def gather(values: np.ndarray, rows: np.ndarray, fill: float | int = np.nan) -> np.ndarray:
    """``values[rows]`` with ``fill`` where ``rows`` is -1 (no row)."""
    values = np.asarray(values)
    if len(values) == 0:
        return np.full(len(rows), fill, dtype=np.result_type(values.dtype, np.asarray(fill)))
    return np.where(rows >= 0, values[np.maximum(rows, 0)], fill)


def running_count(sorted_keys: np.ndarray) -> np.ndarray:
    """1, 2, 3, ... within each run of equal keys of an array sorted by key."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype="int64")
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    start_pos = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - start_pos + 1


def weighted_mean_by_row(
    rows: np.ndarray, values: np.ndarray, weights: np.ndarray, n_rows: int
) -> np.ndarray:
    """Per output row, the ``weights``-weighted mean of the non-missing ``values`` mapped to it.

    Rows whose usable weights sum to zero fall back to the plain mean; rows without a value are
    NaN. This is how multi-line postings become one number (lines weighted by value).
    """
    rows = np.asarray(rows, dtype="int64")
    values = np.asarray(values, dtype="float64")
    weights = np.nan_to_num(np.asarray(weights, dtype="float64"), nan=0.0)
    known = ~np.isnan(values)
    safe_values = np.where(known, values, 0.0)
    usable_weights = np.where(known & (weights > 0), weights, 0.0)
    weighted_sum = np.bincount(rows, weights=usable_weights * safe_values, minlength=n_rows)
    weight_total = np.bincount(rows, weights=usable_weights, minlength=n_rows)
    plain_sum = np.bincount(rows, weights=safe_values, minlength=n_rows)
    count = np.bincount(rows, weights=known.astype("float64"), minlength=n_rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            weight_total > 0,
            weighted_sum / weight_total,
            np.where(count > 0, plain_sum / count, np.nan),
        )
