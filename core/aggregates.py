"""How postings ended, and the history aggregates learned from it, with point-in-time lookups.

Three layers, each usable on its own:

- **Point-in-time primitives** (:func:`to_ns`, :func:`encode_keys`, :func:`latest_row`): "the
  latest row of this key at or before t" for many (key, t) pairs at once, one
  ``pd.merge_asof`` per call. Feature code uses them too.
- **Resolutions** (:func:`build_resolutions`, :func:`build_open_mask`): when and how each posting
  closed (buyer cancellation, other cancellation, delivery), and whether it is open at a moment.
  Labels and the history rates both stand on this one definition.
- :class:`HistoryAggregates`: buyer-cancellation rates per carrier, region and SKU, and each
  customer's posting and buyer-cancellation counts, kept as time-stamped cumulative counts.
  Fitted once in training at ``as_of`` and stored with the model, so serving never recomputes
  them from one request; a lookup at a moment ``t <= as_of`` sees exactly what was known at ``t``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.tables import PUSH_KINDS, SCAN_KINDS, TERMINAL_STATUSES, UTC_TS, HistoryTables

logger = logging.getLogger(__name__)

NAT_NS = np.iinfo(np.int64).min  # how NaT looks as int64 nanoseconds
NS_PER_HOUR = 3_600_000_000_000

# Outcomes of a closed posting. Only "buyer_cancelled" is a positive anywhere in the project.
BUYER_CANCELLED = "buyer_cancelled"
OTHER_CANCELLED = "other_cancelled"  # seller, ozon, system, delivery
UNKNOWN_CANCELLED = "unknown_cancelled"  # initiator unknown
DELIVERED = "delivered"
NON_BUYER_INITIATORS = frozenset({"seller", "ozon", "system", "delivery"})

# Pseudo-postings at the global rate added to every group: a carrier with 3 resolved postings
# says little, one with 3,000 speaks for itself.
DEFAULT_PRIOR_STRENGTH = 20.0
AGGREGATES_VERSION = "1"

# Rates keyed by a posting column; the SKU rate is keyed by the items' ``sku`` instead.
POSTING_RATE_GROUPS: dict[str, str] = {"carrier": "carrier_id", "region": "region"}
# The inputs whose absence before their first event means "not collected yet", by the column of
# the stored aggregates' meta that keeps since when the learned history held them.
COLLECTED_KINDS: dict[str, tuple[str, ...]] = {
    "pushes_collected_since": PUSH_KINDS,
    "scans_collected_since": SCAN_KINDS,
}
LOOKUP_COLUMNS = [
    "carrier_buyer_cancel_rate",
    "region_buyer_cancel_rate",
    "sku_buyer_cancel_rate",
    "buyer_earlier_postings",
    "buyer_earlier_buyer_cancels",
]


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


# --- resolutions ------------------------------------------------------------------------------


def build_resolutions(postings: pd.DataFrame) -> pd.DataFrame:
    """How and when each posting closed, aligned with ``postings`` (same index).

    Columns: ``closed_at`` (the earlier known closing time; a tie counts as the cancellation),
    ``outcome`` (:data:`BUYER_CANCELLED`, :data:`OTHER_CANCELLED`, :data:`UNKNOWN_CANCELLED`,
    :data:`DELIVERED`, or NA while not closed) and ``closing_time_unknown`` (a terminal status
    without any closing time: such a posting cannot be placed in time and is never open).
    """
    cancelled_ns = to_ns(postings["cancelled_at"])
    delivered_ns = to_ns(postings["delivered_at"])
    has_cancel = cancelled_ns != NAT_NS
    has_delivery = delivered_ns != NAT_NS
    cancel_first = has_cancel & (~has_delivery | (cancelled_ns <= delivered_ns))
    delivery_first = has_delivery & ~cancel_first
    closed_ns = np.where(cancel_first, cancelled_ns, np.where(delivery_first, delivered_ns, NAT_NS))

    cancelled_by = postings["cancelled_by"].astype("string")
    by_buyer = cancelled_by.eq("buyer").to_numpy(dtype=bool, na_value=False)
    by_other = cancelled_by.isin(NON_BUYER_INITIATORS).to_numpy(dtype=bool, na_value=False)
    outcome = np.select(
        [cancel_first & by_buyer, cancel_first & by_other, cancel_first, delivery_first],
        [BUYER_CANCELLED, OTHER_CANCELLED, UNKNOWN_CANCELLED, DELIVERED],
        default="",
    )
    terminal = postings["status"].astype("string").isin(TERMINAL_STATUSES)
    return pd.DataFrame(
        {
            "posting_number": postings["posting_number"].astype("string").to_numpy(),
            "closed_at": from_ns(closed_ns).array,
            "outcome": pd.array(np.where(outcome == "", None, outcome), dtype="string"),
            "closing_time_unknown": terminal.to_numpy(dtype=bool, na_value=False)
            & (closed_ns == NAT_NS),
        },
        index=postings.index,
    )


def build_open_mask(
    ordered_ns: np.ndarray,
    closed_ns: np.ndarray,
    closing_time_unknown: np.ndarray,
    as_of_ns: np.ndarray,
) -> np.ndarray:
    """Open at ``as_of``: ordered at or before it, and not closed at or before it.

    A posting whose closing time is unknown although its status is terminal is never open.
    """
    ordered = (ordered_ns != NAT_NS) & (ordered_ns <= as_of_ns)
    not_closed = (closed_ns == NAT_NS) | (closed_ns > as_of_ns)
    return ordered & not_closed & ~np.asarray(closing_time_unknown, dtype=bool)


# --- history aggregates -----------------------------------------------------------------------


def _cumulative_counts(
    keys: pd.Series, at_ns: np.ndarray, increments: Mapping[str, np.ndarray]
) -> pd.DataFrame:
    """One row per (key, time): the counts summed over all rows of the key up to that time.

    Rows without a key or a time are dropped. The result is sorted by key, then time.
    """
    keys = pd.Series(keys).reset_index(drop=True)
    usable = keys.notna().to_numpy() & (at_ns != NAT_NS)
    codes, uniques = pd.factorize(keys[usable], sort=True)
    at = np.asarray(at_ns)[usable]
    order = np.lexsort((at, codes))
    codes, at = codes[order], at[order]
    # One group per (key, time); "first" marks the first group of each key.
    boundary = np.r_[True, (codes[1:] != codes[:-1]) | (at[1:] != at[:-1])]
    starts = np.flatnonzero(boundary[: len(codes)])
    group_key = codes[starts]
    first = np.r_[True, group_key[1:] != group_key[:-1]]
    key_first_group = np.maximum.accumulate(np.where(first, np.arange(len(starts)), 0))
    out = pd.DataFrame({"key": pd.Series(uniques.take(group_key)), "at": from_ns(at[starts])})
    for name, values in increments.items():
        increment = np.asarray(values, dtype="int64")[usable][order]
        per_group = np.add.reduceat(increment, starts) if len(starts) else increment
        running = np.cumsum(per_group)
        before_key = (running - per_group)[key_first_group]
        out[name] = running - before_key
    return out


# Keys of moments: a column, or a plain list (the few moments of a REST request: None missing).
Keys = pd.Series | pd.api.extensions.ExtensionArray | np.ndarray | list


def _missing(values: Keys) -> np.ndarray:
    if isinstance(values, list):
        return np.array([value is None for value in values], dtype=bool)
    return pd.Series(values, copy=False).isna().to_numpy()


class CountsIndex:
    """A cumulative count table (:func:`_cumulative_counts`) ready for point-in-time lookups.

    Built once per table of a fitted :class:`HistoryAggregates`: the distinct keys as an index
    (a query key becomes a code by one hash lookup) and a :class:`PointInTimeIndex` of the rows,
    so the few moments of a REST request cost a few numpy calls instead of re-encoding and
    re-sorting the whole table. Many moments (a training set's million) take one factorisation
    and ``merge_asof``'s linear merge, which is faster there; both give the same rows.
    """

    def __init__(self, counts: pd.DataFrame) -> None:
        keys = counts["key"]
        self.keys = pd.Index(pd.unique(keys.dropna()))
        self.key_column = keys.reset_index(drop=True)
        self.row_ns = to_ns(counts["at"])
        self.rows = PointInTimeIndex(self.keys.get_indexer(keys), self.row_ns)
        names = [name for name in counts.columns if name not in ("key", "at")]
        self.position = {name: j for j, name in enumerate(names)}
        # One row per table row and a last row of zeros: what a query with no row gets.
        self.values = np.zeros((len(counts) + 1, len(names)))
        if names:
            self.values[:-1] = counts[names].to_numpy(dtype="float64")

    @cached_property
    def _sorted_integer_keys(self) -> tuple[np.ndarray, np.ndarray]:
        keys = self.keys.to_numpy(dtype="int64")
        order = np.argsort(keys)
        return keys[order], order

    def _integer_codes(self, query: np.ndarray) -> np.ndarray:
        if self.keys.dtype.kind not in "iu" or len(self.keys) == 0:
            return self.codes(pd.Series(query))
        keys, order = self._sorted_integer_keys
        at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return np.where(keys[at] == query, order[at], -1)

    @cached_property
    def _code_of(self) -> dict[object, int]:
        return {key: code for code, key in enumerate(self.keys.tolist())}

    def codes(self, query_keys: Keys) -> np.ndarray:
        """The code of each query key; -1 for a key the table does not hold or a missing one.

        A list is looked up key by key in a dictionary (for a few keys, cheaper than pandas).
        """
        if isinstance(query_keys, list):
            code_of = self._code_of
            return np.array([code_of.get(key, -1) for key in query_keys], dtype="int64")
        if isinstance(query_keys, np.ndarray) and query_keys.dtype.kind in "iu":
            return self._integer_codes(query_keys)
        query = pd.Series(query_keys, copy=False)
        missing = query.isna().to_numpy()
        if len(self.keys) == 0:
            return np.full(len(query), -1, dtype="int64")
        if query.dtype != self.keys.dtype:
            query = query.astype(self.keys.dtype)
        return np.where(missing, -1, self.keys.get_indexer(query))

    def at(
        self,
        query_keys: Keys,
        query_ns: np.ndarray,
        columns: list[str],
        *,
        strictly_before: bool = False,
    ) -> dict[str, np.ndarray]:
        """The cumulative ``columns`` for each (key, t); 0 where nothing came before."""
        if len(query_ns) <= SMALL_LOOKUP_SIZE:
            codes = self.codes(query_keys)
            rows = self.rows.latest(codes, query_ns, strictly_before=strictly_before)
        else:  # a training set's million moments: one factorisation and merge_asof's merge
            table_codes, codes = encode_keys(self.key_column, pd.Series(query_keys, copy=False))
            rows = latest_row(
                table_codes, self.row_ns, codes, query_ns, strictly_before=strictly_before
            )
        values = self.values[np.where(rows >= 0, rows, len(self.values) - 1)]
        return {name: values[:, self.position[name]] for name in columns}


def _smoothed_rate(
    cancels: np.ndarray, resolved: np.ndarray, prior_rate: np.ndarray, prior_strength: float
) -> np.ndarray:
    """Additive smoothing towards ``prior_rate``: (c + m * p) / (n + m)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cancels + prior_strength * prior_rate) / (resolved + prior_strength)


class HistoryAggregates:
    """Buyer-cancellation rates and customer counts learned from the history resolved at ``as_of``.

    Built by :meth:`fit`; all learned state ends in ``_``. Every aggregate is stored as
    time-stamped cumulative counts, so one fitted object answers point-in-time lookups for any
    moment up to its ``as_of_`` (a training set with rows at many moments uses one object), and
    for later moments (serving) returns the values at ``as_of_``.

    Only buyer cancellations count as cancellations; a posting cancelled by anyone else counts as
    neither cancelled nor delivered, and a cancellation without a known time is not counted.
    """

    def __init__(self, prior_strength: float = DEFAULT_PRIOR_STRENGTH) -> None:
        if not prior_strength >= 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")
        self.prior_strength = float(prior_strength)

    @classmethod
    def fit(
        cls,
        tables: HistoryTables,
        as_of: pd.Timestamp | str,
        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    ) -> HistoryAggregates:
        """Learn the aggregates from what ``tables`` held at ``as_of`` (nothing later is read)."""
        self = cls(prior_strength)
        self.as_of_ = to_utc(as_of)
        as_of_ns = self.as_of_.value
        postings = tables.postings
        resolutions = build_resolutions(postings)
        closed_ns = to_ns(resolutions["closed_at"])
        known = (closed_ns != NAT_NS) & (closed_ns <= as_of_ns)
        outcome = resolutions["outcome"]
        buyer_cancel = (known & outcome.eq(BUYER_CANCELLED).to_numpy(bool, na_value=False)).astype(
            "int64"
        )
        delivered = (known & outcome.eq(DELIVERED).to_numpy(bool, na_value=False)).astype("int64")
        resolved_ns = np.where(known, closed_ns, NAT_NS)

        self.rate_counts_ = {}
        increments = {"buyer_cancels": buyer_cancel, "deliveries": delivered}
        for group, column in POSTING_RATE_GROUPS.items():
            self.rate_counts_[group] = _cumulative_counts(postings[column], resolved_ns, increments)
        self.rate_counts_["sku"] = self._sku_counts(tables, resolved_ns, increments)
        self.rate_counts_["global"] = _cumulative_counts(
            pd.Series(np.zeros(len(postings), dtype="int64")), resolved_ns, increments
        )

        ordered_ns = to_ns(postings["ordered_at"])
        ordered_known = (ordered_ns != NAT_NS) & (ordered_ns <= as_of_ns)
        self.customer_postings_ = _cumulative_counts(
            postings["customer_id"],
            np.where(ordered_known, ordered_ns, NAT_NS),
            {"postings": np.ones(len(postings), dtype="int64")},
        )
        self.customer_buyer_cancels_ = _cumulative_counts(
            postings["customer_id"], resolved_ns, {"buyer_cancels": buyer_cancel}
        )
        self.collecting_since_ = {
            kinds: first_event_ns(tables.events, kinds, as_of_ns)
            for kinds in COLLECTED_KINDS.values()
        }
        logger.info(
            "history aggregates at %s: %d buyer cancellations, %d deliveries resolved",
            self.as_of_,
            int(buyer_cancel.sum()),
            int(delivered.sum()),
        )
        return self

    @staticmethod
    def _sku_counts(
        tables: HistoryTables, resolved_ns: np.ndarray, increments: Mapping[str, np.ndarray]
    ) -> pd.DataFrame:
        """Per SKU: each resolved posting that holds the SKU counts once, however many lines."""
        position = positions_of(tables.postings["posting_number"], tables.items["posting_number"])
        lines = pd.DataFrame({"position": position, "sku": tables.items["sku"].to_numpy()})
        lines = lines[(lines["position"] >= 0) & lines["sku"].notna()]
        lines = lines.drop_duplicates()
        rows = lines["position"].to_numpy(dtype="int64")
        return _cumulative_counts(
            lines["sku"].astype("Int64"),
            resolved_ns[rows],
            {name: np.asarray(values)[rows] for name, values in increments.items()},
        )

    def lookup(self, keys: pd.DataFrame, lines: pd.DataFrame | None = None) -> pd.DataFrame:
        """Point-in-time aggregates for each row of ``keys``.

        ``keys`` has one row per moment with ``carrier_id``, ``region``, ``customer_id``,
        ``ordered_at`` and ``as_of``. ``lines`` (optional) lists the moment's product lines with
        ``row`` (0-based position of the moment in ``keys``), ``sku`` and ``weight`` (the line's
        value); the SKU rate is their weighted mean. Rates use what was resolved at ``as_of``;
        ``buyer_earlier_postings`` counts the customer's postings ordered strictly before
        ``ordered_at``, ``buyer_earlier_buyer_cancels`` their buyer cancellations at ``as_of``.
        A moment after the fitted ``as_of_`` gets the values at ``as_of_``. Unseen keys get the
        global rate; a missing customer gets missing counts.
        """
        if lines is None or len(lines) == 0:
            line_row, line_sku, line_weight = np.zeros(0, dtype="int64"), None, np.zeros(0)
        else:
            line_row = lines["row"].to_numpy(dtype="int64")
            line_sku = lines["sku"]
            line_weight = lines["weight"].to_numpy(dtype="float64", na_value=np.nan)
        out = self.lookup_columns(
            carrier_id=keys["carrier_id"],
            region=keys["region"],
            customer_id=keys["customer_id"],
            ordered_ns=to_ns(keys["ordered_at"]),
            as_of_ns=to_ns(keys["as_of"]),
            line_row=line_row,
            line_sku=line_sku,
            line_weight=line_weight,
        )
        return pd.DataFrame(out, index=keys.index)[LOOKUP_COLUMNS]

    def lookup_columns(
        self,
        *,
        carrier_id: Keys,
        region: Keys,
        customer_id: Keys,
        ordered_ns: np.ndarray,
        as_of_ns: np.ndarray,
        line_row: np.ndarray,
        line_sku: Keys | None,
        line_weight: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """:meth:`lookup` on columns: one value per moment of each of :data:`LOOKUP_COLUMNS`.

        The moments' keys and times are given as columns; their product lines as the moment's
        position (``line_row``), SKU and weight of each line.
        """
        n = len(as_of_ns)
        # NaT is the smallest int64, so it stays NaT (no match) under the minimum.
        as_of_ns = np.minimum(as_of_ns, self.as_of_.value)
        columns = ["buyer_cancels", "deliveries"]
        indexes = self.indexes
        global_counts = indexes["global"].at(np.zeros(n, dtype="int64"), as_of_ns, columns)
        resolved = global_counts["buyer_cancels"] + global_counts["deliveries"]
        with np.errstate(invalid="ignore", divide="ignore"):
            global_rate = np.where(resolved > 0, global_counts["buyer_cancels"] / resolved, np.nan)

        out: dict[str, np.ndarray] = {}
        for group, column_keys in (("carrier", carrier_id), ("region", region)):
            counts = indexes[group].at(column_keys, as_of_ns, columns)
            out[f"{group}_buyer_cancel_rate"] = _smoothed_rate(
                counts["buyer_cancels"],
                counts["buyer_cancels"] + counts["deliveries"],
                global_rate,
                self.prior_strength,
            )
        out["sku_buyer_cancel_rate"] = self._sku_rate(
            line_row, line_sku, line_weight, as_of_ns, global_rate, n
        )

        has_customer = ~_missing(customer_id)
        earlier = indexes["customer_postings"].at(
            customer_id, ordered_ns, ["postings"], strictly_before=True
        )["postings"]
        cancels = indexes["customer_buyer_cancels"].at(customer_id, as_of_ns, ["buyer_cancels"])[
            "buyer_cancels"
        ]
        out["buyer_earlier_postings"] = np.where(has_customer, earlier, np.nan)
        out["buyer_earlier_buyer_cancels"] = np.where(has_customer, cancels, np.nan)
        return out

    def collecting_since(self, kinds: tuple[str, ...]) -> int:
        """Since when the learned history holds events of ``kinds`` (NaT: none, or not known)."""
        return getattr(self, "collecting_since_", {}).get(kinds, NAT_NS)

    @property
    def indexes(self) -> dict[str, CountsIndex]:
        """Every count table as a :class:`CountsIndex`, built at the first lookup and kept."""
        indexes = self.__dict__.get("_indexes")
        if indexes is None:
            tables = dict(self.rate_counts_)
            tables["customer_postings"] = self.customer_postings_
            tables["customer_buyer_cancels"] = self.customer_buyer_cancels_
            indexes = {name: CountsIndex(frame) for name, frame in tables.items()}
            self._indexes = indexes
        return indexes

    def _sku_rate(
        self,
        line_row: np.ndarray,
        line_sku: Keys | None,
        line_weight: np.ndarray,
        as_of_ns: np.ndarray,
        global_rate: np.ndarray,
        n_rows: int,
    ) -> np.ndarray:
        """Value-weighted mean over the moment's lines of each SKU's smoothed rate."""
        if line_sku is None or len(line_row) == 0:
            return np.full(n_rows, np.nan)
        counts = self.indexes["sku"].at(
            line_sku, as_of_ns[line_row], ["buyer_cancels", "deliveries"]
        )
        line_rate = _smoothed_rate(
            counts["buyer_cancels"],
            counts["buyer_cancels"] + counts["deliveries"],
            global_rate[line_row],
            self.prior_strength,
        )
        line_rate = np.where(_missing(line_sku), np.nan, line_rate)
        return weighted_mean_by_row(line_row, line_rate, line_weight, n_rows)

    def to_frames(self) -> dict[str, pd.DataFrame]:
        """The learned state as plain frames (one parquet file each); see :meth:`from_frames`."""
        frames = {f"rates_{group}": frame.copy() for group, frame in self.rate_counts_.items()}
        frames["customer_postings"] = self.customer_postings_.copy()
        frames["customer_buyer_cancels"] = self.customer_buyer_cancels_.copy()
        frames["meta"] = pd.DataFrame(
            {
                "as_of": pd.Series([self.as_of_]).astype(UTC_TS),
                "prior_strength": [self.prior_strength],
                "aggregates_version": pd.array([AGGREGATES_VERSION], dtype="string"),
                **{
                    column: from_ns(np.array([self.collecting_since(kinds)])).array
                    for column, kinds in COLLECTED_KINDS.items()
                },
            }
        )
        return frames

    @classmethod
    def from_frames(cls, frames: Mapping[str, pd.DataFrame]) -> HistoryAggregates:
        """Rebuild the aggregates from :meth:`to_frames` output (for example read from parquet)."""
        meta = frames["meta"]
        version = str(meta["aggregates_version"].iloc[0])
        if version != AGGREGATES_VERSION:
            raise ValueError(
                f"history aggregates of version {version!r}; this code reads {AGGREGATES_VERSION!r}"
            )
        self = cls(float(meta["prior_strength"].iloc[0]))
        self.as_of_ = to_utc(meta["as_of"].iloc[0])
        self.rate_counts_ = {
            name.removeprefix("rates_"): _normalised_counts(frame)
            for name, frame in frames.items()
            if name.startswith("rates_")
        }
        self.customer_postings_ = _normalised_counts(frames["customer_postings"])
        self.customer_buyer_cancels_ = _normalised_counts(frames["customer_buyer_cancels"])
        # Aggregates stored before these columns existed know nothing of collection times.
        self.collecting_since_ = {
            kinds: int(to_ns(meta[column])[0]) if column in meta.columns else NAT_NS
            for column, kinds in COLLECTED_KINDS.items()
        }
        return self


def _normalised_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """A stored count frame with its canonical dtypes (parquet may change time resolution)."""
    out = frame.reset_index(drop=True).copy()
    out["at"] = out["at"].astype(UTC_TS)
    return out
