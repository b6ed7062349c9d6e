"""How postings ended, and the history aggregates learned from it, with point-in-time lookups.

Two layers, each usable on its own, on the primitives of :mod:`core.point_in_time`:

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

import numpy as np
import pandas as pd

from core.point_in_time import (
    NAT_NS,
    SMALL_LOOKUP_SIZE,
    PointInTimeIndex,
    encode_keys,
    first_event_ns,
    from_ns,
    latest_row,
    positions_of,
    to_ns,
    to_utc,
    weighted_mean_by_row,
)
from core.tables import PUSH_KINDS, SCAN_KINDS, TERMINAL_STATUSES, UTC_TS, HistoryTables

logger = logging.getLogger(__name__)


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
