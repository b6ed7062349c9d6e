"""Point-in-time features: the one feature function of the project.

Training, the REST service and the nightly batch all call :func:`build_features` (or
:func:`build_feature_rows` for many moments at once). A feature for a posting at a moment
``as_of`` reads only what was known then: events with ``at <= as_of``, closing and handover
times only through an explicit ``<= as_of`` check, and never the posting's export-time status or
cancellation fields. Every "latest value at as_of" is one ``pd.merge_asof`` per event kind
(:func:`core.aggregates.latest_row`); multi-line postings become one number by value-weighted
means. Nothing loops over postings or moments in Python.

A family whose input file is absent yields NaN. "Absent" is judged at ``as_of`` too: until the
first scan (or push) anywhere in the history, scan (or push) counts are unknown rather than zero,
so a seller who started archiving late does not teach the model that old orders had no scans.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from core.aggregates import (
    NAT_NS,
    NS_PER_HOUR,
    HistoryAggregates,
    build_open_mask,
    build_resolutions,
    earliest_ns,
    encode_keys,
    first_event_ns,
    from_ns,
    gather,
    latest_row,
    positions_of,
    running_count,
    to_ns,
    to_utc,
    weighted_mean_by_row,
)
from core.tables import PUSH_KINDS, SCAN_KINDS, HistoryTables

logger = logging.getLogger(__name__)

FEATURE_VERSION = "2"

FEATURE_FAMILIES: dict[str, list[str]] = {
    "price_since_purchase": [
        "price_change_pct",  # latest logged price vs paid, %; negative = cheaper now
        "lowest_price_change_pct",  # lowest price in force since purchase vs paid, %
        "price_changes_since_purchase",
        "promotion_since_purchase",  # share of order value whose offer got a promo discount
    ],
    "carrier_and_promise": [
        "carrier",
        "promised_lead_time_hours",  # order -> promised delivery end, promise at order time
        "hours_to_shipment_deadline",
        "hours_to_promised_delivery_end",  # negative when late
        "delivery_date_changes",
        "delivery_date_shift_hours",  # promised end at as_of minus promised end at order
    ],
    "timeline": [
        "hours_since_order",
        "is_handed_over",
        "hours_since_handover",
        "hours_since_last_activity",  # last scan or state-change push; since order when none
        "carrier_scans",
        "hours_since_last_scan",
        "delivery_stage",  # furthest stage reached: 0 created .. 4 at the pickup point
        "hours_in_delivery_stage",  # since that stage was reached
        "silent_hours_since_handover",  # tracking silence beyond the tolerated gaps, summed
    ],
    "listing": [
        "card_edits_since_purchase",
        "hours_since_last_card_edit",
    ],
    "buyer_and_order": [
        "region",
        "payment_type",
        "delivery_type",
        "is_premium",
        "is_legal",
        "total_quantity",
        "product_lines",
        "order_value_rub",
        "buyer_earlier_postings",
        "buyer_earlier_buyer_cancels",
    ],
    "history_rates": [
        "carrier_buyer_cancel_rate",
        "sku_buyer_cancel_rate",
        "region_buyer_cancel_rate",
    ],
}
FEATURE_COLUMNS: list[str] = [column for family in FEATURE_FAMILIES.values() for column in family]
CATEGORICAL_COLUMNS: list[str] = ["carrier", "region", "payment_type", "delivery_type"]
STATIC_COLUMNS: list[str] = [
    "carrier",
    "region",
    "payment_type",
    "is_premium",
    "total_quantity",
    "order_value_rub",
    "promised_lead_time_hours",
]

# Approximate RUB per unit. The order value only ranks orders by size, so rates a few percent
# off change nothing the model can see, and fixed rates keep the feature reproducible.
RUB_PER_UNIT: dict[str, float] = {
    "RUB": 1.0,
    "CNY": 11.5,
    "USD": 85.0,
    "EUR": 95.0,
    "KZT": 0.17,
    "BYN": 27.0,
}


# Ozon posting substates (TYPE_STATE_CHANGED ``new_state``) by how far the parcel has got. How
# long a buyer stays exposed depends on it: a parcel at the pickup point ends within days, one
# just handed over has its whole transit ahead. Unknown substates say nothing about the stage.
DELIVERY_STAGES: dict[str, int] = {
    "posting_created": 0,
    "posting_awaiting_registration": 0,
    "posting_transferring_to_delivery": 1,
    "posting_driver_pick_up": 1,
    "posting_in_carriage": 2,
    "posting_on_way_to_city": 3,
    "posting_transferred_to_courier_service": 3,
    "posting_in_courier_service": 3,
    "posting_on_way_to_pickup_point": 3,
    "posting_in_pickup_point": 4,
    "posting_conditionally_delivered": 4,
}
HANDED_OVER_STAGE = 1
# A gap between two tracking events (or since the last one) up to this long is ordinary; what
# goes beyond it is silence (the same two days after which tracking counts as gone quiet).
TOLERATED_SILENCE_HOURS = 48.0


# A feature column: floats as numpy, strings as a pandas string array (a round trip of strings
# through Python objects costs more than all the numeric work of a family).
ColumnValues = np.ndarray | pd.api.extensions.ExtensionArray


# --- small numeric helpers --------------------------------------------------------------------


def _hours(later_ns: np.ndarray, earlier_ns: np.ndarray) -> np.ndarray:
    """(later - earlier) in hours, NaN where either is NaT; exact integer subtraction first."""
    valid = (later_ns != NAT_NS) & (earlier_ns != NAT_NS)
    delta = np.where(valid, later_ns, 0) - np.where(valid, earlier_ns, 0)
    return np.where(valid, delta / NS_PER_HOUR, np.nan)


def _range_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``min(values[lo:hi + 1])`` for each query, NaN where the range is empty.

    A sparse table: level k holds the minima of windows of 2**k, and any range is covered by two
    overlapping windows, so each level is one vectorised step over the queries of its length.
    """
    out = np.full(len(lo), np.nan)
    ok = (lo >= 0) & (hi >= lo)
    if not ok.any():
        return out
    lo, hi = lo[ok], hi[ok]
    level = np.floor(np.log2(hi - lo + 1)).astype("int64")
    window_min = np.asarray(values, dtype="float64")
    result = np.empty(len(lo))
    for k in range(int(level.max()) + 1):
        if k > 0:
            half = 1 << (k - 1)
            window_min = np.fmin(window_min[:-half], window_min[half:])
        chosen = level == k
        if chosen.any():
            result[chosen] = np.fmin(window_min[lo[chosen]], window_min[hi[chosen] - (1 << k) + 1])
    out[ok] = result
    return out


def _expand(group_of_moment: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair each moment with every row of its group, rows being sorted by group.

    ``counts[g]`` is the number of rows of group ``g``. Returns (moment, row) positions; moments
    of group -1 get no rows.
    """
    starts = np.cumsum(counts) - counts
    moments = np.flatnonzero(group_of_moment >= 0)
    groups = group_of_moment[moments]
    per_moment = counts[groups]
    moment_idx = np.repeat(moments, per_moment)
    offset = np.arange(len(moment_idx)) - np.repeat(np.cumsum(per_moment) - per_moment, per_moment)
    return moment_idx, np.repeat(starts[groups], per_moment) + offset


def _collected_at(first_ns: int, as_of_ns: np.ndarray) -> np.ndarray:
    """Whether an input first seen at ``first_ns`` was being collected at each ``as_of``."""
    if first_ns == NAT_NS:
        return np.zeros(len(as_of_ns), dtype=bool)
    return as_of_ns >= first_ns


# --- the shared context -----------------------------------------------------------------------


class FeatureContext:
    """What the feature families share for one batch of moments, each part computed once.

    Moments are addressed by position 0..n-1; ``posting_row`` is the moment's posting's position
    in ``tables.postings`` (-1 for a posting the tables do not hold).
    """

    def __init__(
        self, tables: HistoryTables, moments: pd.DataFrame, aggregates: HistoryAggregates
    ) -> None:
        self.tables = tables
        self.aggregates = aggregates
        self.n = len(moments)
        self.as_of_ns = to_ns(moments["as_of"])
        self.posting_numbers = tables.postings["posting_number"]
        self.posting_row = positions_of(self.posting_numbers, moments["posting_number"])
        self.ordered_ns = self.posting_ns("ordered_at")
        self._events_by_kind: dict[str, pd.DataFrame] = {}
        self._event_rows_by_kind: dict[str, np.ndarray] = {}

    def posting_ns(self, column: str) -> np.ndarray:
        """A timestamp column of each moment's posting, as int64 ns (NaT for unknown postings)."""
        return gather(to_ns(self.tables.postings[column]), self.posting_row, fill=NAT_NS)

    def posting_values(self, column: str) -> pd.Series:
        """A column of each moment's posting, NA for unknown postings, keeping the column dtype."""
        array = self.tables.postings[column].array
        return pd.Series(array.take(self.posting_row, allow_fill=True))

    def events_of(self, kind: str) -> pd.DataFrame:
        """Events of one kind with a known time, with ``at_ns`` added (selected once per kind)."""
        if kind not in self._events_by_kind:
            events = self.tables.events
            chosen = events["kind"].eq(kind).to_numpy(dtype=bool, na_value=False)
            chosen &= events["at"].notna().to_numpy()
            positions = np.flatnonzero(chosen)
            selected = events.take(positions)
            self._events_by_kind[kind] = selected.assign(at_ns=to_ns(selected["at"]))
            self._event_rows_by_kind[kind] = self._all_event_posting_rows[positions]
        return self._events_by_kind[kind]

    def event_posting_rows(self, kind: str) -> np.ndarray:
        """The posting row of each of :meth:`events_of` ``kind`` (-1 for unknown postings)."""
        self.events_of(kind)
        return self._event_rows_by_kind[kind]

    @cached_property
    def _all_event_posting_rows(self) -> np.ndarray:
        """The posting row of every event (-1: none or unknown), looked up in one pass."""
        return positions_of(self.posting_numbers, self.tables.events["posting_number"])

    def _collecting_since(self, kinds: tuple[str, ...]) -> int:
        """Since when the shop archives events of ``kinds``: the earliest such event of these
        tables or of the history the aggregates learned (a REST request holds one posting's
        events only, and a posting without scans yet is still one of a shop that collects them).
        """
        return earliest_ns(
            first_event_ns(self.tables.events, kinds),
            self.aggregates.collecting_since(kinds),
        )

    @cached_property
    def pushes_collected(self) -> np.ndarray:
        """Per moment: pushes were being archived at ``as_of``."""
        return _collected_at(self._collecting_since(PUSH_KINDS), self.as_of_ns)

    @cached_property
    def scans_collected(self) -> np.ndarray:
        """Per moment: carrier scans were being collected at ``as_of``."""
        return _collected_at(self._collecting_since(SCAN_KINDS), self.as_of_ns)

    @cached_property
    def items(self) -> pd.DataFrame:
        """Product lines of known postings in a canonical order (posting, then line).

        The canonical order makes every per-moment sum add its lines in the same order whatever
        the order of the input rows, so shuffled tables give identical numbers.
        """
        items = self.tables.items
        posting_row = positions_of(self.posting_numbers, items["posting_number"])
        frame = pd.DataFrame(
            {
                "posting_row": posting_row.astype("int64"),
                "line_no": items["line_no"].to_numpy(dtype="float64", na_value=np.nan),
                "offer_id": items["offer_id"].astype("string").array,
                "sku": items["sku"].astype("Int64").array,
                "quantity": items["quantity"].to_numpy(dtype="float64", na_value=np.nan),
                "unit_price": items["unit_price"].to_numpy(dtype="float64", na_value=np.nan),
                "currency_code": items["currency_code"].astype("string").array,
            }
        )
        frame = frame[frame["posting_row"] >= 0]
        frame = frame.sort_values(
            [
                "posting_row",
                "line_no",
                "offer_id",
                "sku",
                "quantity",
                "unit_price",
                "currency_code",
            ],
            kind="stable",
        ).reset_index(drop=True)
        frame["value"] = frame["unit_price"] * frame["quantity"]
        return frame

    @cached_property
    def moment_lines(self) -> tuple[np.ndarray, np.ndarray]:
        """(moment, item) position pairs: every product line of every moment's posting."""
        counts = np.bincount(
            self.items["posting_row"].to_numpy(), minlength=len(self.posting_numbers)
        )
        return _expand(self.posting_row, counts)

    @cached_property
    def history(self) -> pd.DataFrame:
        """The learned history aggregates looked up at each moment (point in time)."""
        keys = pd.DataFrame(
            {
                "carrier_id": self.posting_values("carrier_id"),
                "region": self.posting_values("region"),
                "customer_id": self.posting_values("customer_id"),
                "ordered_at": from_ns(self.ordered_ns),
                "as_of": from_ns(self.as_of_ns),
            }
        )
        moment_idx, item_idx = self.moment_lines
        lines = pd.DataFrame(
            {
                "row": moment_idx,
                "sku": self.items["sku"].array.take(item_idx),
                "weight": self.items["value"].to_numpy()[item_idx],
            }
        )
        return self.aggregates.lookup(keys, lines).reset_index(drop=True)


# --- promise at a moment ----------------------------------------------------------------------


def _promise_at(
    tables: HistoryTables, posting_row: np.ndarray, at_ns: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The promised delivery (begin, end) in force at ``at_ns`` and the changes known by then.

    After a delivery-date change the promise is its new dates; before the first change it is
    that change's old dates; a posting without changes keeps the snapshot's promise.
    """
    snapshot_begin = gather(
        to_ns(tables.postings["promised_delivery_begin_at"]), posting_row, NAT_NS
    )
    snapshot_end = gather(to_ns(tables.postings["promised_delivery_end_at"]), posting_row, NAT_NS)
    no_changes = np.zeros(len(at_ns))
    events = tables.events
    changes = events[events["kind"].eq("delivery_date_change").to_numpy(dtype=bool, na_value=False)]
    changes = changes[changes["at"].notna().to_numpy()]
    row = positions_of(tables.postings["posting_number"], changes["posting_number"])
    changes, row = changes[row >= 0], row[row >= 0]
    if len(changes) == 0:
        return snapshot_begin, snapshot_end, no_changes

    columns = [
        "delivery_begin_at",
        "delivery_end_at",
        "old_delivery_begin_at",
        "old_delivery_end_at",
    ]
    dates = {name: to_ns(changes[name]) for name in columns}
    at = to_ns(changes["at"])
    # posting, then time, then the dates themselves: simultaneous changes resolve the same way
    # whatever the row order.
    order = np.lexsort([dates[name] for name in reversed(columns)] + [at, row])
    row, at = row[order], at[order]
    dates = {name: values[order] for name, values in dates.items()}
    count = running_count(row)

    latest = latest_row(row, at, posting_row, at_ns)
    first = np.searchsorted(row, posting_row, side="left")
    first = np.minimum(first, len(row) - 1)
    has_changes = (posting_row >= 0) & (row[first] == posting_row)

    def promise(new: str, old: str, snapshot: np.ndarray) -> np.ndarray:
        before_first = np.where(has_changes, dates[old][first], snapshot)
        return np.where(latest >= 0, gather(dates[new], latest, NAT_NS), before_first)

    return (
        promise("delivery_begin_at", "old_delivery_begin_at", snapshot_begin),
        promise("delivery_end_at", "old_delivery_end_at", snapshot_end),
        gather(count.astype("float64"), latest, 0.0),
    )


def build_promise_at(tables: HistoryTables, moments: pd.DataFrame) -> pd.DataFrame:
    """The promised delivery window in force at each moment (``posting_number``, ``as_of``).

    Returns ``promised_delivery_begin_at``, ``promised_delivery_end_at`` and
    ``delivery_date_changes`` (changes known at ``as_of``), indexed like ``moments``.
    """
    posting_row = positions_of(tables.postings["posting_number"], moments["posting_number"])
    begin, end, changes = _promise_at(tables, posting_row, to_ns(moments["as_of"]))
    return pd.DataFrame(
        {
            "promised_delivery_begin_at": from_ns(begin).array,
            "promised_delivery_end_at": from_ns(end).array,
            "delivery_date_changes": changes,
        },
        index=moments.index,
    )


# --- feature families -------------------------------------------------------------------------


def _empty_family(ctx: FeatureContext, family: str) -> dict[str, ColumnValues]:
    return {column: np.full(ctx.n, np.nan) for column in FEATURE_FAMILIES[family]}


@dataclass(frozen=True)
class _PriceLog:
    """The price log sorted by offer, then time, with prefix sums for range queries.

    Rows of one offer are contiguous, so "this offer's rows between two moments" is a slice of
    positions and every count over it is a difference of two prefix sums.
    """

    offer: np.ndarray  # offer code per row
    at: np.ndarray  # ns
    price: np.ndarray
    currency: np.ndarray  # currency code, -1 when the row gives none
    changes: np.ndarray  # prefix sums of rows whose price differs from the offer's previous row
    promotions: np.ndarray  # prefix sums of rows with old_price > price
    with_currency: np.ndarray  # prefix sums of rows that give a currency
    by_currency: np.ndarray  # (rows + 1, currencies) prefix sums of rows per currency

    @classmethod
    def build(
        cls,
        offer: np.ndarray,
        at: np.ndarray,
        price: np.ndarray,
        old_price: np.ndarray,
        currency: np.ndarray,
        n_currencies: int,
    ) -> _PriceLog:
        keep = np.flatnonzero(offer >= 0)
        # Offer, then time, then content: simultaneous rows resolve the same for any row order.
        order = keep[
            np.lexsort((currency[keep], old_price[keep], price[keep], at[keep], offer[keep]))
        ]
        offer, at, price = offer[order], at[order], price[order]
        old_price, currency = old_price[order], currency[order]
        is_change = np.r_[False, offer[1:] == offer[:-1]] & (price != np.r_[np.nan, price[:-1]])
        one_hot = np.zeros((len(order), max(n_currencies, 1)), dtype="int64")
        one_hot[np.flatnonzero(currency >= 0), currency[currency >= 0]] = 1
        return cls(
            offer=offer,
            at=at,
            price=price,
            currency=currency,
            changes=np.r_[0, np.cumsum(is_change)],
            promotions=np.r_[0, np.cumsum(np.nan_to_num(old_price, nan=-np.inf) > price)],
            with_currency=np.r_[0, np.cumsum(currency >= 0)],
            by_currency=np.vstack(
                [np.zeros((1, one_hot.shape[1]), dtype="int64"), one_hot.cumsum(0)]
            ),
        )

    def in_force(self, offer: np.ndarray, at_ns: np.ndarray) -> np.ndarray:
        """Position of the row in force (the latest at or before) at each time; -1 if none."""
        return latest_row(self.offer, self.at, offer, at_ns)

    def first_of(self, offer: np.ndarray) -> np.ndarray:
        """Position of each offer's first row (callers only use it for offers with rows)."""
        return np.searchsorted(self.offer, offer, side="left")

    @staticmethod
    def count(prefix: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """Rows counted by ``prefix`` in ``[start, stop)``; 0 for an empty range."""
        return prefix[stop] - prefix[np.minimum(start, stop)]

    def other_currency_in(
        self, start: np.ndarray, stop: np.ndarray, currency: np.ndarray
    ) -> np.ndarray:
        """Whether ``[start, stop)`` holds a row in a known currency other than ``currency``."""
        start = np.minimum(start, stop)
        code = np.maximum(currency, 0)
        same = self.by_currency[stop, code] - self.by_currency[start, code]
        return (currency >= 0) & (self.count(self.with_currency, start, stop) > same)


def _encode_sorted(table_keys: pd.Series, query_keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`encode_keys`, but the codes follow the keys' sort order, not the row order.

    Currency codes break ties between simultaneous price rows: codes by first appearance would
    let the order of the input rows decide which of them is in force.
    """
    table = pd.Series(table_keys, dtype="string").reset_index(drop=True)
    query = pd.Series(query_keys, dtype="string").reset_index(drop=True)
    codes, _ = pd.factorize(pd.concat([table, query], ignore_index=True), sort=True)
    codes = codes.astype("int64")
    return codes[: len(table)], codes[len(table) :]


def _relative_pct(value: np.ndarray, paid: np.ndarray, comparable: np.ndarray) -> np.ndarray:
    """(value / paid - 1) in percent where comparable and paid > 0, else NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(comparable & (paid > 0), (value / paid - 1.0) * 100.0, np.nan)


def build_price_since_purchase(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """The paid price against the price log of the posting's offers since purchase.

    Per line: the latest logged price at ``as_of`` vs the paid unit price, the lowest price in
    force since purchase vs paid, the number of logged price changes after purchase, and whether
    a promotion (a row with ``old_price > price``) appeared after purchase. Lines are combined by
    value. Relative changes compare same-currency values only: a logged row in another currency
    makes the comparison missing; a row without a currency is taken to be in the shop's currency.
    An offer with no logged price yet at ``as_of`` gives missing values.
    """
    out = _empty_family(ctx, "price_since_purchase")
    prices = ctx.events_of("price")
    prices = prices[prices["offer_id"].notna().to_numpy() & prices["price"].notna().to_numpy()]
    moment_idx, item_idx = ctx.moment_lines
    if len(prices) == 0 or len(moment_idx) == 0:
        return out
    items = ctx.items
    offer, item_offer = encode_keys(prices["offer_id"].astype("string"), items["offer_id"])
    currency, item_currency = _encode_sorted(
        prices["currency_code"].astype("string"), items["currency_code"]
    )
    log = _PriceLog.build(
        offer,
        prices["at_ns"].to_numpy(),
        prices["price"].to_numpy(dtype="float64", na_value=np.nan),
        prices["old_price"].to_numpy(dtype="float64", na_value=np.nan),
        currency,
        n_currencies=int(max(currency.max(initial=-1), item_currency.max(initial=-1))) + 1,
    )

    # The row in force at purchase is found once per line, the one at as_of per moment-line.
    item_ordered_ns = gather(
        to_ns(ctx.tables.postings["ordered_at"]), items["posting_row"].to_numpy(), NAT_NS
    )
    at_purchase = log.in_force(item_offer, item_ordered_ns)[item_idx]
    line_offer, line_currency = item_offer[item_idx], item_currency[item_idx]
    now = log.in_force(line_offer, ctx.as_of_ns[moment_idx])
    known = now >= 0
    first = log.first_of(line_offer)
    stop = np.where(known, now, 0) + 1
    after_purchase = np.where(at_purchase >= 0, at_purchase + 1, first)  # changes after it
    in_force_since = np.where(at_purchase >= 0, at_purchase, first)  # prices a buyer could see

    paid = items["unit_price"].to_numpy()[item_idx]
    now_currency = gather(log.currency, now, -1)
    same_currency = (line_currency < 0) | (now_currency < 0) | (line_currency == now_currency)
    lowest = _range_min(log.price, np.where(known, in_force_since, -1), now)
    per_line = {
        "price_change_pct": _relative_pct(gather(log.price, now), paid, known & same_currency),
        "lowest_price_change_pct": _relative_pct(
            lowest, paid, known & ~log.other_currency_in(in_force_since, stop, line_currency)
        ),
        "price_changes_since_purchase": np.where(
            known, log.count(log.changes, after_purchase, stop), np.nan
        ),
        "promotion_since_purchase": np.where(
            known, log.count(log.promotions, after_purchase, stop) > 0, np.nan
        ),
    }
    weights = items["value"].to_numpy()[item_idx]
    for column, values in per_line.items():
        out[column] = weighted_mean_by_row(moment_idx, values, weights, ctx.n)
    return out


def build_carrier_and_promise(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Carrier, promised lead time, time left to the deadlines, delivery-date changes known."""
    _, end_now, changes = _promise_at(ctx.tables, ctx.posting_row, ctx.as_of_ns)
    _, end_at_order, _ = _promise_at(ctx.tables, ctx.posting_row, ctx.ordered_ns)
    pushes = ctx.pushes_collected
    return {
        "carrier": ctx.posting_values("carrier_id").astype("string").array,
        "promised_lead_time_hours": _hours(end_at_order, ctx.ordered_ns),
        "hours_to_shipment_deadline": _hours(ctx.posting_ns("shipment_deadline_at"), ctx.as_of_ns),
        "hours_to_promised_delivery_end": _hours(end_now, ctx.as_of_ns),
        "delivery_date_changes": np.where(pushes, changes, np.nan),
        "delivery_date_shift_hours": np.where(pushes, _hours(end_now, end_at_order), np.nan),
    }


def _posting_event_times(
    ctx: FeatureContext, kinds: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(posting row, at_ns) of the posting events of ``kinds``, sorted by posting then time."""
    row = np.concatenate([ctx.event_posting_rows(kind) for kind in kinds])
    at = np.concatenate([ctx.events_of(kind)["at_ns"].to_numpy() for kind in kinds])
    row, at = row[row >= 0], at[row >= 0]
    order = np.lexsort((at, row))
    return row[order], at[order]


def _delivery_stage(
    ctx: FeatureContext, handed_over: np.ndarray, handed_over_ns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The furthest delivery stage reached at each ``as_of`` and when it was reached (ns).

    Stages come from the state pushes known at ``as_of`` (:data:`DELIVERY_STAGES`); a known
    handover counts as stage 1 from its time even without its push. Before any stage the
    posting is at stage 0 since its order. NaN (NaT) while pushes were not being archived.
    """
    events = ctx.events_of("state_change")
    # Each distinct state looked up once (millions of pushes, a few dozen states).
    codes, states = pd.factorize(events["state"].astype("string"))
    stage_of = np.array([DELIVERY_STAGES.get(state, np.nan) for state in states] + [np.nan])
    stage = stage_of[codes]  # a missing state has code -1: the NaN at the end
    row = ctx.event_posting_rows("state_change")
    keep = (row >= 0) & ~np.isnan(stage)
    row, at, stage = row[keep], events["at_ns"].to_numpy()[keep], stage[keep].astype("int64")
    # Posting, then time, then stage: simultaneous pushes resolve the same whatever their order.
    order = np.lexsort((stage, at, row))
    row, at, stage = row[order], at[order], stage[order]
    # The furthest stage so far within each posting: rows ascend, so a running maximum of
    # (row, stage) packed into one key never carries a stage over to the next posting.
    span = max(DELIVERY_STAGES.values()) + 1
    reached, reached_at = stage, at
    if len(row):
        reached = np.maximum.accumulate(row * span + stage) - row * span
        first = np.r_[True, (row[1:] != row[:-1]) | (reached[1:] != reached[:-1])]
        reached_at = at[np.maximum.accumulate(np.where(first, np.arange(len(row)), 0))]

    latest = latest_row(row, at, ctx.posting_row, ctx.as_of_ns)
    stage_now = gather(reached.astype("float64"), latest, 0.0)
    since_ns = gather(reached_at, latest, NAT_NS)
    since_ns = np.where(latest >= 0, since_ns, ctx.ordered_ns)
    handover_first = handed_over & (stage_now < HANDED_OVER_STAGE)
    stage_now = np.where(handover_first, float(HANDED_OVER_STAGE), stage_now)
    since_ns = np.where(handover_first, handed_over_ns, since_ns)
    known = ctx.pushes_collected
    return np.where(known, stage_now, np.nan), np.where(known, since_ns, NAT_NS)


def _silent_hours_since_handover(
    ctx: FeatureContext,
    handed_over: np.ndarray,
    handed_over_ns: np.ndarray,
    activity_row: np.ndarray,
    activity_at: np.ndarray,
) -> np.ndarray:
    """Hours of tracking silence since the handover, up to each ``as_of``.

    The gaps between the handover, each later tracking event (scan or state push) and
    ``as_of`` each count with what exceeds :data:`TOLERATED_SILENCE_HOURS`. Parcels barely move
    while their tracking is silent, so the sum says how much of the time since the handover
    the parcel spent stuck. NaN before the handover (``handed_over``: per moment, handed over
    by ``as_of``, at ``handed_over_ns``).
    """
    posting_handed_ns = to_ns(ctx.tables.postings["handed_over_at"])
    handed_ns = gather(posting_handed_ns, activity_row, NAT_NS)
    keep = (handed_ns != NAT_NS) & (activity_at >= handed_ns)
    row, at, handed_ns = activity_row[keep], activity_at[keep], handed_ns[keep]
    # Summed in integer nanoseconds: exact, so the sum does not depend on other postings.
    silent_so_far_ns = np.zeros(len(row), dtype="int64")
    if len(row):
        starts = np.r_[True, row[1:] != row[:-1]]
        previous = np.where(starts, handed_ns, np.r_[handed_ns[:1], at[:-1]])
        tolerated = round(TOLERATED_SILENCE_HOURS * NS_PER_HOUR)
        excess = np.maximum(at - previous - tolerated, 0)
        total = np.cumsum(excess)
        start_pos = np.maximum.accumulate(np.where(starts, np.arange(len(row)), 0))
        silent_so_far_ns = total - (total - excess)[start_pos]

    latest = latest_row(row, at, ctx.posting_row, ctx.as_of_ns)
    last_ns = np.where(latest >= 0, gather(at, latest, NAT_NS), handed_over_ns)
    open_gap = _hours(ctx.as_of_ns, last_ns) - TOLERATED_SILENCE_HOURS
    silent_so_far = gather(silent_so_far_ns, latest, 0) / NS_PER_HOUR
    silent = silent_so_far + np.maximum(np.nan_to_num(open_gap), 0.0)
    return np.where(handed_over, silent, np.nan)


def build_timeline(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Where the posting is in its life: age, handover, delivery stage, scans and silence."""
    scan_row, scan_at = _posting_event_times(ctx, ("carrier_scan",))
    last_scan = latest_row(scan_row, scan_at, ctx.posting_row, ctx.as_of_ns)
    scan_count = gather(running_count(scan_row).astype("float64"), last_scan, 0.0)
    last_scan_ns = gather(scan_at, last_scan, NAT_NS)

    state_row, state_at = _posting_event_times(ctx, ("state_change",))
    last_state_ns = gather(
        state_at, latest_row(state_row, state_at, ctx.posting_row, ctx.as_of_ns), NAT_NS
    )
    last_activity_ns = np.maximum(last_scan_ns, last_state_ns)  # NaT is the smallest int64
    last_activity_ns = np.where(last_activity_ns == NAT_NS, ctx.ordered_ns, last_activity_ns)
    activity_known = ctx.scans_collected | ctx.pushes_collected

    handed_over_ns = ctx.posting_ns("handed_over_at")
    handed_over = (handed_over_ns != NAT_NS) & (handed_over_ns <= ctx.as_of_ns)
    stage, stage_since_ns = _delivery_stage(ctx, handed_over, handed_over_ns)
    activity_row, activity_at = _posting_event_times(ctx, ("carrier_scan", "state_change"))
    silent_hours = _silent_hours_since_handover(
        ctx, handed_over, handed_over_ns, activity_row, activity_at
    )
    return {
        "hours_since_order": _hours(ctx.as_of_ns, ctx.ordered_ns),
        "is_handed_over": handed_over.astype("float64"),
        "hours_since_handover": np.where(handed_over, _hours(ctx.as_of_ns, handed_over_ns), np.nan),
        "hours_since_last_activity": np.where(
            activity_known, _hours(ctx.as_of_ns, last_activity_ns), np.nan
        ),
        "carrier_scans": np.where(ctx.scans_collected, scan_count, np.nan),
        "hours_since_last_scan": _hours(ctx.as_of_ns, last_scan_ns),
        "delivery_stage": stage,
        "hours_in_delivery_stage": _hours(ctx.as_of_ns, stage_since_ns),
        "silent_hours_since_handover": np.where(activity_known, silent_hours, np.nan),
    }


def build_listing(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Product-card edits of the posting's offers after purchase, known at ``as_of``."""
    out = _empty_family(ctx, "listing")
    edits = ctx.events_of("card_edit")
    edits = edits[edits["offer_id"].notna().to_numpy()]
    posting_offers = (
        ctx.items[["posting_row", "offer_id"]]
        .dropna()
        .drop_duplicates()
        .sort_values(["posting_row", "offer_id"], kind="stable")
        .reset_index(drop=True)
    )
    pushes = ctx.pushes_collected
    counts = np.bincount(
        posting_offers["posting_row"].to_numpy(), minlength=len(ctx.posting_numbers)
    )
    moment_idx, offer_idx = _expand(ctx.posting_row, counts)
    if len(edits) == 0 or len(moment_idx) == 0:
        out["card_edits_since_purchase"] = np.where(pushes, 0.0, np.nan)
        return out

    offer, item_offer = encode_keys(edits["offer_id"].astype("string"), posting_offers["offer_id"])
    at = edits["at_ns"].to_numpy()
    order = np.lexsort((at, offer))
    offer, at = offer[order], at[order]
    count = running_count(offer).astype("float64")

    ordered_ns = gather(
        to_ns(ctx.tables.postings["ordered_at"]), posting_offers["posting_row"].to_numpy(), NAT_NS
    )
    before_purchase = gather(count, latest_row(offer, at, item_offer, ordered_ns), 0.0)[offer_idx]
    latest = latest_row(offer, at, item_offer[offer_idx], ctx.as_of_ns[moment_idx])
    since_purchase = np.maximum(gather(count, latest, 0.0) - before_purchase, 0.0)
    last_edit_ns = gather(at, latest, NAT_NS)
    last_edit_ns = np.where(last_edit_ns > ctx.ordered_ns[moment_idx], last_edit_ns, NAT_NS)

    edits_total = np.bincount(moment_idx, weights=since_purchase, minlength=ctx.n)
    last_per_moment = np.full(ctx.n, NAT_NS, dtype="int64")
    np.maximum.at(last_per_moment, moment_idx, last_edit_ns)
    out["card_edits_since_purchase"] = np.where(pushes, edits_total, np.nan)
    out["hours_since_last_card_edit"] = _hours(ctx.as_of_ns, last_per_moment)
    return out


def _posting_order_totals(ctx: FeatureContext) -> pd.DataFrame:
    """Per posting (by position): total quantity, number of lines, value in RUB."""
    items = ctx.items
    rate = items["currency_code"].map(RUB_PER_UNIT).to_numpy(dtype="float64", na_value=np.nan)
    frame = pd.DataFrame(
        {
            "posting_row": items["posting_row"],
            "quantity": items["quantity"],
            "value_rub": items["value"] * rate,
        }
    )
    grouped = frame.groupby("posting_row", sort=False)
    totals = pd.DataFrame(
        {
            "total_quantity": grouped["quantity"].sum(min_count=1),
            # One line of unknown currency or quantity makes the whole value unknown.
            "order_value_rub": grouped["value_rub"]
            .sum(min_count=1)
            .where(grouped["value_rub"].count() == grouped.size()),
            "product_lines": grouped.size().astype("float64"),
        }
    )
    return totals.reindex(np.arange(len(ctx.posting_numbers)))


def _as_float(values: pd.Series) -> np.ndarray:
    return values.astype("Float64").to_numpy(dtype="float64", na_value=np.nan)


def build_buyer_and_order(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Who ordered what: region, payment, delivery type, premium, size, value, buyer history."""
    totals = _posting_order_totals(ctx)
    row = np.maximum(ctx.posting_row, 0)
    lines = totals["product_lines"].to_numpy()[row]
    history = ctx.history
    return {
        "region": ctx.posting_values("region").astype("string").array,
        "payment_type": ctx.posting_values("payment_type").astype("string").array,
        "delivery_type": ctx.posting_values("delivery_type").astype("string").array,
        "is_premium": _as_float(ctx.posting_values("is_premium")),
        "is_legal": _as_float(ctx.posting_values("is_legal")),
        "total_quantity": totals["total_quantity"].to_numpy()[row],
        "product_lines": np.nan_to_num(lines, nan=0.0),
        "order_value_rub": totals["order_value_rub"].to_numpy()[row],
        "buyer_earlier_postings": history["buyer_earlier_postings"].to_numpy(),
        "buyer_earlier_buyer_cancels": history["buyer_earlier_buyer_cancels"].to_numpy(),
    }


def build_history_rates(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Smoothed buyer-cancellation rates of the carrier, the SKUs and the region at ``as_of``."""
    history = ctx.history
    return {column: history[column].to_numpy() for column in FEATURE_FAMILIES["history_rates"]}


FAMILY_BUILDERS: dict[str, Callable[[FeatureContext], dict[str, ColumnValues]]] = {
    "price_since_purchase": build_price_since_purchase,
    "carrier_and_promise": build_carrier_and_promise,
    "timeline": build_timeline,
    "listing": build_listing,
    "buyer_and_order": build_buyer_and_order,
    "history_rates": build_history_rates,
}


# --- public entry points ----------------------------------------------------------------------


def _normalised_moments(moments: pd.DataFrame) -> pd.DataFrame:
    """Moments with a string ``posting_number`` and a UTC ``as_of``; refuses unusable ones."""
    missing = {"posting_number", "as_of"} - set(moments.columns)
    if missing:
        raise ValueError(f"moments need the columns {sorted(missing)}")
    as_of = pd.to_datetime(moments["as_of"], utc=True).astype("datetime64[ns, UTC]")
    if as_of.isna().any():
        raise ValueError("every moment needs an as_of timestamp")
    return pd.DataFrame(
        {
            "posting_number": moments["posting_number"].astype("string").to_numpy(),
            "as_of": as_of.array,
        }
    )


def _check_unique_postings(tables: HistoryTables) -> None:
    duplicated = tables.postings["posting_number"].duplicated()
    if duplicated.any():
        examples = tables.postings.loc[duplicated, "posting_number"].head(3).tolist()
        raise ValueError(f"posting numbers must be unique in the postings table: {examples}")


def build_feature_rows(
    tables: HistoryTables,
    moments: pd.DataFrame,
    aggregates: HistoryAggregates | None = None,
) -> pd.DataFrame:
    """Features for each moment (``posting_number``, ``as_of``), one row each, in the same order.

    Returns a frame indexed like ``moments`` with exactly :data:`FEATURE_COLUMNS`: categorical
    columns as strings, all others float (NaN = unknown). ``aggregates`` are the history
    aggregates learned in training; without them they are fitted on ``tables`` at the latest
    moment (point in time either way). A moment whose posting the tables do not hold gets all
    features missing.
    """
    _check_unique_postings(tables)
    normalised = _normalised_moments(moments)
    if len(normalised) == 0:
        return _assemble({column: np.empty(0) for column in FEATURE_COLUMNS}, moments.index)
    if aggregates is None:
        aggregates = HistoryAggregates.fit(tables, normalised["as_of"].max())
    # Moments in time order: every point-in-time join then meets its queries already sorted.
    order = np.argsort(to_ns(normalised["as_of"]), kind="stable")
    ctx = FeatureContext(tables, normalised.take(order).reset_index(drop=True), aggregates)

    columns: dict[str, ColumnValues] = {}
    for builder in FAMILY_BUILDERS.values():
        columns.update(builder(ctx))
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    columns = {name: _take(values, restore) for name, values in columns.items()}
    unknown = ctx.posting_row[restore] < 0
    if unknown.any():
        logger.warning("%d moments refer to postings the tables do not hold", int(unknown.sum()))
        columns = {name: _blank(values, unknown) for name, values in columns.items()}
    return _assemble(columns, moments.index)


def _take(values: ColumnValues, rows: np.ndarray) -> ColumnValues:
    if isinstance(values, pd.api.extensions.ExtensionArray):
        return values.take(rows)
    return np.asarray(values)[rows]


def _blank(values: ColumnValues, where: np.ndarray) -> ColumnValues:
    """``values`` missing (NA or NaN) where ``where``."""
    if isinstance(values, pd.api.extensions.ExtensionArray):
        values = values.copy()
        values[where] = pd.NA
        return values
    return np.where(where, np.nan, values)


def _assemble(columns: dict[str, ColumnValues], index: pd.Index) -> pd.DataFrame:
    """The feature frame: :data:`FEATURE_COLUMNS` in order, strings or floats."""
    data = {
        column: pd.array(columns[column], dtype="string")
        if column in CATEGORICAL_COLUMNS
        else np.asarray(columns[column], dtype="float64")
        for column in FEATURE_COLUMNS
    }
    return pd.DataFrame(data, index=index)


def open_postings_at(tables: HistoryTables, as_of: pd.Timestamp | str) -> pd.Index:
    """The posting numbers open at ``as_of`` (ordered, not delivered or cancelled by then), sorted.

    A posting with a terminal status but no known closing time cannot be placed in time and is
    never open; how many there are is logged.
    """
    as_of_ns = to_utc(as_of).value
    postings = tables.postings
    resolutions = build_resolutions(postings)
    ordered_ns = to_ns(postings["ordered_at"])
    unplaceable = resolutions["closing_time_unknown"].to_numpy()
    is_open = build_open_mask(
        ordered_ns, to_ns(resolutions["closed_at"]), unplaceable, np.full(len(postings), as_of_ns)
    )
    n_unplaceable = int((unplaceable & (ordered_ns != NAT_NS) & (ordered_ns <= as_of_ns)).sum())
    if n_unplaceable:
        logger.info(
            "%d postings have a terminal status but no closing time and are never open",
            n_unplaceable,
        )
    numbers = postings.loc[is_open, "posting_number"].astype("string")
    return pd.Index(numbers.sort_values().to_numpy(), dtype="string", name="posting_number")


def build_features(
    tables: HistoryTables,
    as_of: pd.Timestamp | str,
    aggregates: HistoryAggregates | None = None,
) -> pd.DataFrame:
    """Features of every posting open at ``as_of``, indexed by ``posting_number``.

    The feature function of the project; the same as :func:`build_feature_rows` on the moments
    (open posting, ``as_of``).
    """
    as_of = to_utc(as_of)
    open_postings = open_postings_at(tables, as_of)
    moments = pd.DataFrame(
        {
            "posting_number": open_postings.to_numpy(),
            "as_of": from_ns(np.full(len(open_postings), as_of.value, dtype="int64")),
        }
    )
    rows = build_feature_rows(tables, moments, aggregates)
    rows.index = open_postings
    return rows
