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
    from_ns,
    gather,
    latest_row,
    plain_keys,
    positions_of,
    running_count,
    to_ns,
    to_utc,
    weighted_mean_by_row,
)
from core.columns import (
    Array,
    Columns,
    HistoryColumns,
    is_missing,
    key_text,
    lookup_keys,
    map_keys,
    sort_codes,
    take_keys,
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


# A feature column: floats as numpy, text as the keys of the history (core.columns): a pandas
# string array from tables (a round trip of strings through Python objects costs more than all
# the numeric work of a family), an object array from a request.
ColumnValues = Array


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


def _collected_at(first_ns: int | np.ndarray, as_of_ns: np.ndarray) -> np.ndarray:
    """Whether an input first seen at ``first_ns`` (per moment, or one time for all) was being
    collected at each ``as_of``."""
    first_ns = np.asarray(first_ns, dtype="int64")
    return (first_ns != NAT_NS) & (as_of_ns >= first_ns)


def _earliest(first_ns: int | np.ndarray, other_ns: int) -> int | np.ndarray:
    """:func:`earliest_ns` of a time per posting (or one) and one other time."""
    if np.ndim(first_ns) == 0:
        return earliest_ns(int(first_ns), other_ns)
    if other_ns == NAT_NS:
        return first_ns
    return np.where(first_ns == NAT_NS, other_ns, np.minimum(first_ns, other_ns))


# --- the shared context -----------------------------------------------------------------------


class FeatureContext:
    """What the feature families share for one batch of moments, each part computed once.

    Moments are addressed by position 0..n-1; ``posting_row`` is the moment's posting's position
    in ``history.postings`` (-1 for a posting the history does not hold).
    """

    def __init__(
        self,
        history: HistoryColumns,
        posting_numbers: Array,
        as_of_ns: np.ndarray,
        aggregates: HistoryAggregates,
    ) -> None:
        self.history = history
        self.aggregates = aggregates
        self.n = len(as_of_ns)
        self.as_of_ns = as_of_ns
        self.posting_numbers = history.postings["posting_number"]
        self.posting_row = positions_of(self.posting_numbers, posting_numbers)
        self.ordered_ns = self.posting_ns("ordered_at")
        self._event_rows_by_kind: dict[str, np.ndarray] = {}

    def posting_ns(self, column: str) -> np.ndarray:
        """A timestamp column of each moment's posting, as int64 ns (NaT for unknown postings)."""
        return gather(self.history.postings[column], self.posting_row, fill=NAT_NS)

    def posting_values(self, column: str) -> Array:
        """A key column of each moment's posting, missing for unknown postings."""
        return take_keys(self.history.postings[column], self.posting_row)

    def posting_numbers_of(self, column: str) -> np.ndarray:
        """A number column of each moment's posting, NaN for unknown postings."""
        return gather(self.history.postings[column], self.posting_row)

    def events_of(self, kind: str) -> Columns:
        """Events of one kind with a known time."""
        return self.history.events(kind)

    def event_posting_rows(self, kind: str) -> np.ndarray:
        """The posting row of each of :meth:`events_of` ``kind`` (-1 for unknown postings)."""
        if kind not in self._event_rows_by_kind:
            numbers = self.events_of(kind)["posting_number"]
            self._event_rows_by_kind[kind] = positions_of(self.posting_numbers, numbers)
        return self._event_rows_by_kind[kind]

    def _collecting_since(self, kinds: tuple[str, ...]) -> int | np.ndarray:
        """Since when the shop archives events of ``kinds``, per moment (or one time for all):
        the earliest such event of the history or of the history the aggregates learned (a
        REST request holds one posting's events only, and a posting without scans yet is still
        one of a shop that collects them).
        """
        since = _earliest(
            self.history.first_event_ns(kinds), self.aggregates.collecting_since(kinds)
        )
        if np.ndim(since) == 0:
            return since
        return gather(since, self.posting_row, NAT_NS)

    @cached_property
    def pushes_collected(self) -> np.ndarray:
        """Per moment: pushes were being archived at ``as_of``."""
        return _collected_at(self._collecting_since(PUSH_KINDS), self.as_of_ns)

    @cached_property
    def scans_collected(self) -> np.ndarray:
        """Per moment: carrier scans were being collected at ``as_of``."""
        return _collected_at(self._collecting_since(SCAN_KINDS), self.as_of_ns)

    @cached_property
    def items(self) -> Columns:
        """Product lines of known postings in a canonical order (posting, then line).

        The canonical order makes every per-moment sum add its lines in the same order whatever
        the order of the input rows, so shuffled tables give identical numbers. ``posting_row``
        and ``value`` (unit price times quantity) are added.
        """
        items = self.history.items
        posting_row = positions_of(self.posting_numbers, items["posting_number"])
        known = np.flatnonzero(posting_row >= 0)
        lines = items.take(known)
        posting_row = posting_row[known]
        order = np.lexsort(
            (
                sort_codes(lines["currency_code"]),
                lines["unit_price"],
                lines["quantity"],
                sort_codes(lines["sku"]),
                sort_codes(lines["offer_id"]),
                lines["line_no"],
                posting_row,
            )
        )
        ordered = lines.take(order)
        quantity, unit_price = ordered["quantity"], ordered["unit_price"]
        return Columns(
            len(order),
            {
                "posting_row": posting_row[order],
                "line_no": ordered["line_no"],
                "offer_id": ordered["offer_id"],
                "sku": ordered["sku"],
                "quantity": quantity,
                "unit_price": unit_price,
                "currency_code": ordered["currency_code"],
                "value": unit_price * quantity,
            },
        )

    @cached_property
    def moment_lines(self) -> tuple[np.ndarray, np.ndarray]:
        """(moment, item) position pairs: every product line of every moment's posting."""
        counts = np.bincount(self.items["posting_row"], minlength=len(self.posting_numbers))
        return _expand(self.posting_row, counts)

    @cached_property
    def history_values(self) -> dict[str, np.ndarray]:
        """The learned history aggregates looked up at each moment (point in time)."""
        moment_idx, item_idx = self.moment_lines
        return self.aggregates.lookup_columns(
            carrier_id=lookup_keys(self.posting_values("carrier_id")),
            region=lookup_keys(self.posting_values("region")),
            customer_id=lookup_keys(self.posting_values("customer_id")),
            ordered_ns=self.ordered_ns,
            as_of_ns=self.as_of_ns,
            line_row=moment_idx,
            line_sku=lookup_keys(self.items["sku"][item_idx]),
            line_weight=self.items["value"][item_idx],
        )


# --- promise at a moment ----------------------------------------------------------------------


def _promise_at(
    history: HistoryColumns, posting_row: np.ndarray, at_ns: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The promised delivery (begin, end) in force at ``at_ns`` and the changes known by then.

    After a delivery-date change the promise is its new dates; before the first change it is
    that change's old dates; a posting without changes keeps the snapshot's promise.
    """
    postings = history.postings
    snapshot_begin = gather(postings["promised_delivery_begin_at"], posting_row, NAT_NS)
    snapshot_end = gather(postings["promised_delivery_end_at"], posting_row, NAT_NS)
    no_changes = np.zeros(len(at_ns))
    changes = history.events("delivery_date_change")
    row = positions_of(postings["posting_number"], changes["posting_number"])
    known = np.flatnonzero(row >= 0)
    if len(known) == 0:
        return snapshot_begin, snapshot_end, no_changes

    columns = [
        "delivery_begin_at",
        "delivery_end_at",
        "old_delivery_begin_at",
        "old_delivery_end_at",
    ]
    row = row[known]
    dates = {name: changes[name][known] for name in columns}
    at = changes["at"][known]
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
    history = HistoryColumns.from_tables(tables)
    posting_row = positions_of(history.postings["posting_number"], moments["posting_number"])
    begin, end, changes = _promise_at(history, posting_row, to_ns(moments["as_of"]))
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


def _encode_sorted(table_keys: Array, query_keys: Array) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`encode_keys`, but the codes follow the keys' sort order as text, not the
    row order.

    Currency codes break ties between simultaneous price rows: codes by first appearance would
    let the order of the input rows decide which of them is in force.
    """
    table_plain, query_plain = plain_keys(table_keys), plain_keys(query_keys)
    if table_plain is not None and query_plain is not None:
        text = [None if key is None else str(key) for key in table_plain + query_plain]
        rank = {key: code for code, key in enumerate(sorted({k for k in text if k is not None}))}
        codes = np.array([-1 if key is None else rank[key] for key in text], dtype="int64")
        return codes[: len(table_plain)], codes[len(table_plain) :]
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
    prices = prices.take(
        np.flatnonzero(~is_missing(prices["offer_id"]) & ~np.isnan(prices["price"]))
    )
    moment_idx, item_idx = ctx.moment_lines
    if len(prices) == 0 or len(moment_idx) == 0:
        return out
    items = ctx.items
    offer, item_offer = encode_keys(prices["offer_id"], items["offer_id"])
    currency, item_currency = _encode_sorted(prices["currency_code"], items["currency_code"])
    log = _PriceLog.build(
        offer,
        prices["at"],
        prices["price"],
        prices["old_price"],
        currency,
        n_currencies=int(max(currency.max(initial=-1), item_currency.max(initial=-1))) + 1,
    )

    # The row in force at purchase is found once per line, the one at as_of per moment-line.
    item_ordered_ns = gather(ctx.history.postings["ordered_at"], items["posting_row"], NAT_NS)
    at_purchase = log.in_force(item_offer, item_ordered_ns)[item_idx]
    line_offer, line_currency = item_offer[item_idx], item_currency[item_idx]
    now = log.in_force(line_offer, ctx.as_of_ns[moment_idx])
    known = now >= 0
    first = log.first_of(line_offer)
    stop = np.where(known, now, 0) + 1
    after_purchase = np.where(at_purchase >= 0, at_purchase + 1, first)  # changes after it
    in_force_since = np.where(at_purchase >= 0, at_purchase, first)  # prices a buyer could see

    paid = items["unit_price"][item_idx]
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
    weights = items["value"][item_idx]
    for column, values in per_line.items():
        out[column] = weighted_mean_by_row(moment_idx, values, weights, ctx.n)
    return out


def build_carrier_and_promise(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Carrier, promised lead time, time left to the deadlines, delivery-date changes known."""
    _, end_now, changes = _promise_at(ctx.history, ctx.posting_row, ctx.as_of_ns)
    _, end_at_order, _ = _promise_at(ctx.history, ctx.posting_row, ctx.ordered_ns)
    pushes = ctx.pushes_collected
    return {
        "carrier": key_text(ctx.posting_values("carrier_id")),
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
    at = np.concatenate([ctx.events_of(kind)["at"] for kind in kinds])
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
    stage = map_keys(events["state"], DELIVERY_STAGES)
    row = ctx.event_posting_rows("state_change")
    keep = (row >= 0) & ~np.isnan(stage)
    row, at, stage = row[keep], events["at"][keep], stage[keep].astype("int64")
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
    handed_ns = gather(ctx.history.postings["handed_over_at"], activity_row, NAT_NS)
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
    edits = edits.take(np.flatnonzero(~is_missing(edits["offer_id"])))
    items = ctx.items
    with_offer = np.flatnonzero(~is_missing(items["offer_id"]))
    offer, item_offer = encode_keys(edits["offer_id"], items["offer_id"][with_offer])
    # Each posting's distinct offers, sorted by posting.
    stride = int(item_offer.max(initial=0)) + 1
    pairs = np.unique(items["posting_row"][with_offer] * stride + item_offer)
    offer_row, offer_code = pairs // stride, pairs % stride
    pushes = ctx.pushes_collected
    counts = np.bincount(offer_row, minlength=len(ctx.posting_numbers))
    moment_idx, offer_idx = _expand(ctx.posting_row, counts)
    if len(edits) == 0 or len(moment_idx) == 0:
        out["card_edits_since_purchase"] = np.where(pushes, 0.0, np.nan)
        return out

    at = edits["at"]
    order = np.lexsort((at, offer))
    offer, at = offer[order], at[order]
    count = running_count(offer).astype("float64")

    ordered_ns = gather(ctx.history.postings["ordered_at"], offer_row, NAT_NS)
    before_purchase = gather(count, latest_row(offer, at, offer_code, ordered_ns), 0.0)[offer_idx]
    latest = latest_row(offer, at, offer_code[offer_idx], ctx.as_of_ns[moment_idx])
    since_purchase = np.maximum(gather(count, latest, 0.0) - before_purchase, 0.0)
    last_edit_ns = gather(at, latest, NAT_NS)
    last_edit_ns = np.where(last_edit_ns > ctx.ordered_ns[moment_idx], last_edit_ns, NAT_NS)

    edits_total = np.bincount(moment_idx, weights=since_purchase, minlength=ctx.n)
    last_per_moment = np.full(ctx.n, NAT_NS, dtype="int64")
    np.maximum.at(last_per_moment, moment_idx, last_edit_ns)
    out["card_edits_since_purchase"] = np.where(pushes, edits_total, np.nan)
    out["hours_since_last_card_edit"] = _hours(ctx.as_of_ns, last_per_moment)
    return out


def _posting_order_totals(ctx: FeatureContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per posting (by position): total quantity, number of lines, value in RUB.

    The total quantity adds the known quantities (NaN when none is known); one line of unknown
    currency or quantity makes the whole value unknown.
    """
    items = ctx.items
    row, n = items["posting_row"], len(ctx.posting_numbers)
    quantity = items["quantity"]
    value_rub = items["value"] * map_keys(items["currency_code"], RUB_PER_UNIT)
    lines = np.bincount(row, minlength=n).astype("float64")
    known_quantity = ~np.isnan(quantity)
    total_quantity = np.where(
        np.bincount(row, weights=known_quantity, minlength=n) > 0,
        np.bincount(row, weights=np.where(known_quantity, quantity, 0.0), minlength=n),
        np.nan,
    )
    unknown_value = np.bincount(row, weights=np.isnan(value_rub), minlength=n) > 0
    order_value = np.bincount(row, weights=np.nan_to_num(value_rub, nan=0.0), minlength=n)
    order_value = np.where((lines > 0) & ~unknown_value, order_value, np.nan)
    return total_quantity, lines, order_value


def build_buyer_and_order(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Who ordered what: region, payment, delivery type, premium, size, value, buyer history."""
    total_quantity, lines, order_value = _posting_order_totals(ctx)
    row = ctx.posting_row
    history = ctx.history_values
    return {
        "region": key_text(ctx.posting_values("region")),
        "payment_type": key_text(ctx.posting_values("payment_type")),
        "delivery_type": key_text(ctx.posting_values("delivery_type")),
        "is_premium": ctx.posting_numbers_of("is_premium"),
        "is_legal": ctx.posting_numbers_of("is_legal"),
        "total_quantity": gather(total_quantity, row),
        "product_lines": gather(lines, row, 0.0),
        "order_value_rub": gather(order_value, row),
        "buyer_earlier_postings": history["buyer_earlier_postings"],
        "buyer_earlier_buyer_cancels": history["buyer_earlier_buyer_cancels"],
    }


def build_history_rates(ctx: FeatureContext) -> dict[str, ColumnValues]:
    """Smoothed buyer-cancellation rates of the carrier, the SKUs and the region at ``as_of``."""
    history = ctx.history_values
    return {column: history[column] for column in FEATURE_FAMILIES["history_rates"]}


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
            "posting_number": moments["posting_number"].astype("string").array,
            "as_of": as_of.array,
        }
    )


def _check_unique_postings(tables: HistoryTables) -> None:
    duplicated = tables.postings["posting_number"].duplicated()
    if duplicated.any():
        examples = tables.postings.loc[duplicated, "posting_number"].head(3).tolist()
        raise ValueError(f"posting numbers must be unique in the postings table: {examples}")


def build_feature_columns(
    history: HistoryColumns,
    posting_numbers: Array,
    as_of_ns: np.ndarray,
    aggregates: HistoryAggregates,
) -> dict[str, ColumnValues]:
    """The feature definition: every feature of each moment (posting, ``as_of`` in UTC ns).

    One column per name of :data:`FEATURE_COLUMNS`, in the moments' order: categorical columns
    as text keys (see :mod:`core.columns`), all others float (NaN = unknown). A moment whose
    posting ``history`` does not hold gets all features missing. This is what training's
    snapshots, the nightly batch and a REST request all run, on a million moments or on one.
    """
    as_of_ns = np.asarray(as_of_ns, dtype="int64")
    # Moments in time order: every point-in-time join then meets its queries already sorted.
    order = np.argsort(as_of_ns, kind="stable")
    ctx = FeatureContext(history, posting_numbers[order], as_of_ns[order], aggregates)
    columns: dict[str, ColumnValues] = {}
    for builder in FAMILY_BUILDERS.values():
        columns.update(builder(ctx))
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    columns = {name: _take(values, restore) for name, values in columns.items()}
    unknown = ctx.posting_row[restore] < 0
    if unknown.any():
        logger.warning("%d moments refer to postings the history does not hold", int(unknown.sum()))
        columns = {name: _blank(values, unknown) for name, values in columns.items()}
    return columns


def build_feature_rows(
    tables: HistoryTables,
    moments: pd.DataFrame,
    aggregates: HistoryAggregates | None = None,
) -> pd.DataFrame:
    """Features for each moment (``posting_number``, ``as_of``), one row each, in the same order.

    :func:`build_feature_columns` on the normalised tables, as a frame indexed like ``moments``
    with exactly :data:`FEATURE_COLUMNS` (categorical columns as ``string``). ``aggregates`` are
    the history aggregates learned in training; without them they are fitted on ``tables`` at
    the latest moment (point in time either way).
    """
    _check_unique_postings(tables)
    normalised = _normalised_moments(moments)
    if len(normalised) == 0:
        return _assemble({column: np.empty(0) for column in FEATURE_COLUMNS}, moments.index)
    if aggregates is None:
        aggregates = HistoryAggregates.fit(tables, normalised["as_of"].max())
    columns = build_feature_columns(
        HistoryColumns.from_tables(tables),
        normalised["posting_number"].array,
        to_ns(normalised["as_of"]),
        aggregates,
    )
    return _assemble(columns, moments.index)


def _take(values: ColumnValues, rows: np.ndarray) -> ColumnValues:
    return values[rows]


def _blank(values: ColumnValues, where: np.ndarray) -> ColumnValues:
    """``values`` missing (NA, None or NaN) where ``where``."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return np.where(where, np.nan, values)
    values = values.copy()
    values[where] = None
    return values


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
