"""The feature families: each computes its columns for every moment of a
:class:`~core.features.context.FeatureContext` with a handful of vectorised steps, the same for
one posting of a REST request and for a million training snapshots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.columns import (
    Array,
    HistoryColumns,
    is_missing,
    key_text,
    map_keys,
)
from core.features.context import FeatureContext, expand_rows, hours_between
from core.features.schema import (
    DELIVERY_STAGES,
    FEATURE_FAMILIES,
    HANDED_OVER_STAGE,
    RUB_PER_UNIT,
    TOLERATED_SILENCE_HOURS,
    ColumnValues,
)
from core.point_in_time import (
    NAT_NS,
    NS_PER_HOUR,
    encode_keys,
    from_ns,
    gather,
    latest_row,
    plain_keys,
    positions_of,
    running_count,
    to_ns,
    weighted_mean_by_row,
)
from core.tables import HistoryTables

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
        "promised_lead_time_hours": hours_between(end_at_order, ctx.ordered_ns),
        "hours_to_shipment_deadline": hours_between(
            ctx.posting_ns("shipment_deadline_at"), ctx.as_of_ns
        ),
        "hours_to_promised_delivery_end": hours_between(end_now, ctx.as_of_ns),
        "delivery_date_changes": np.where(pushes, changes, np.nan),
        "delivery_date_shift_hours": np.where(pushes, hours_between(end_now, end_at_order), np.nan),
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
    open_gap = hours_between(ctx.as_of_ns, last_ns) - TOLERATED_SILENCE_HOURS
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
        "hours_since_order": hours_between(ctx.as_of_ns, ctx.ordered_ns),
        "is_handed_over": handed_over.astype("float64"),
        "hours_since_handover": np.where(
            handed_over, hours_between(ctx.as_of_ns, handed_over_ns), np.nan
        ),
        "hours_since_last_activity": np.where(
            activity_known, hours_between(ctx.as_of_ns, last_activity_ns), np.nan
        ),
        "carrier_scans": np.where(ctx.scans_collected, scan_count, np.nan),
        "hours_since_last_scan": hours_between(ctx.as_of_ns, last_scan_ns),
        "delivery_stage": stage,
        "hours_in_delivery_stage": hours_between(ctx.as_of_ns, stage_since_ns),
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
    moment_idx, offer_idx = expand_rows(ctx.posting_row, counts)
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
    out["hours_since_last_card_edit"] = hours_between(ctx.as_of_ns, last_per_moment)
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
        "is_premium": ctx.posting_floats("is_premium"),
        "is_legal": ctx.posting_floats("is_legal"),
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
