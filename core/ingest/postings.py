"""Seller API posting objects (FBS/rFBS and FBO) -> posting and item rows.

The builder works on decoded JSON values. One Python pass (``core.ingest.raw_postings``) checks
each record's shape and reads every used field into a row tuple (one pass per record costs a
fraction of one pass per field over a large list of dicts); the rows are then transposed into
columns and converted vectorised, so a chunk of postings costs a few dozen column operations
rather than a DataFrame per record. The pass takes any iterable, so a reader can decode each
line just before the pass reads it (see ``core.ingest.jsonlines``). The rules on the values
(who cancelled, usable products and order times) are ``core.ingest.posting_rules``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.ingest.batches import (
    RECORD_SEQ,
    PostingBatch,
    build_canonical,
    build_rejects,
    empty_items,
)

# The REST service's request lane checks quantities against the same bound.
from core.ingest.posting_rules import MAX_QUANTITY as MAX_QUANTITY
from core.ingest.posting_rules import (
    build_cancelled_by,
    build_early_order_mask,
    build_product_checks,
)
from core.ingest.raw_postings import RawColumns, RawPostings
from core.ingest.values import (
    EARLIEST_ORDER_AT,
    build_booleans,
    build_decimals,
    build_integers,
    build_present_mask,
    build_strings,
    build_utc_timestamps,
)
from core.tables import ITEM_COLUMNS, POSTING_COLUMNS

# How far a posting has progressed; a duplicate with more progress carries later information.
STATUS_PROGRESS: dict[str, int] = {
    "acceptance_in_progress": 0,
    "awaiting_approve": 0,
    "awaiting_registration": 0,
    "awaiting_packaging": 1,
    "awaiting_deliver": 2,
    "delivering": 3,
    "driver_pickup": 3,
    "delivered": 4,
    "cancelled": 4,
}


def _first_given(primary: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Element-wise: the primary value unless it is null or "", else the fallback."""
    given = build_present_mask(pd.Series(primary, dtype=object, copy=False))
    return np.where(given, primary, fallback)


def _select(columns: RawColumns, mask: np.ndarray) -> RawColumns:
    return {name: values[mask] for name, values in columns.items()}


def _order_time_reasons(raw: RawColumns) -> tuple[pd.Series, list[str | None]]:
    """The order time (in_process_at, else FBO's created_at) and why it is unusable, if so."""
    in_process = raw["in_process_at"]
    from_created = ~build_present_mask(pd.Series(in_process, dtype=object, copy=False))
    given_raw = _first_given(in_process, raw["created_at"])
    ordered_at, bad = build_utc_timestamps(given_raw)
    given = build_present_mask(pd.Series(given_raw, dtype=object, copy=False))
    early = build_early_order_mask(ordered_at)
    reasons: list[str | None] = [None] * len(given_raw)
    for k in np.flatnonzero(~given | bad | early):
        field = "created_at" if from_created[k] else "in_process_at"
        if not given[k]:
            reasons[k] = "no in_process_at"
        elif bad[k]:
            reasons[k] = f"{field} '{given_raw[k]}' is not a timestamp"
        else:
            reasons[k] = f"{field} '{given_raw[k]}' is before {EARLIEST_ORDER_AT.date()}"
    return ordered_at, reasons


def _build_posting_frame(
    raw: RawColumns, ordered_at: pd.Series, file: str, lines: np.ndarray, scheme: str | None
) -> tuple[pd.DataFrame, int]:
    """Canonical posting rows from raw columns; also the count of unreadable optional dates."""
    optional_dates = {
        column: build_utc_timestamps(raw[field])
        for column, field in (
            ("shipment_deadline_at", "shipment_date"),
            ("handed_over_at", "delivering_date"),
            ("promised_delivery_begin_at", "analytics.delivery_date_begin"),
            ("promised_delivery_end_at", "analytics.delivery_date_end"),
        )
    }
    status = build_strings(raw["status"])
    reason_id, _ = build_integers(
        _first_given(raw["cancellation.cancel_reason_id"], raw["cancel_reason_id"])
    )
    reason_id = reason_id.mask(reason_id.eq(0))
    cancel_reason = build_strings(raw["cancellation.cancel_reason"])
    cancellation_type = build_strings(raw["cancellation.cancellation_type"])
    initiator = build_strings(raw["cancellation.cancellation_initiator"])
    has_cancellation = (
        reason_id.notna() | cancel_reason.notna() | cancellation_type.notna() | initiator.notna()
    )
    cancelled = (status.eq("cancelled").fillna(False) | has_cancellation).to_numpy(dtype=bool)
    if scheme is None:
        fbs = raw["has_fbs_objects"].astype(bool)
        schemes = pd.Series(np.where(fbs, "fbs", "fbo"), dtype="string")
    else:
        schemes = pd.Series([scheme] * len(lines), dtype="string")

    columns: dict[str, Any] = {
        "posting_number": build_strings(raw["posting_number"]),
        "order_id": build_integers(raw["order_id"])[0],
        "order_number": build_strings(raw["order_number"]),
        "scheme": schemes,
        "status": status,
        "ordered_at": ordered_at,
        **{column: parsed for column, (parsed, _) in optional_dates.items()},
        "tracking_number": build_strings(raw["tracking_number"]),
        "delivery_method_id": build_integers(raw["method.id"])[0],
        "delivery_method_name": build_strings(raw["method.name"]),
        "warehouse_id": build_integers(
            _first_given(raw["method.warehouse_id"], raw["analytics.warehouse_id"])
        )[0],
        "carrier_id": build_integers(
            _first_given(raw["method.tpl_provider_id"], raw["analytics.tpl_provider_id"])
        )[0],
        "carrier_name": build_strings(
            _first_given(raw["method.tpl_provider"], raw["analytics.tpl_provider"])
        ),
        "region": build_strings(raw["analytics.region"]),
        "city": build_strings(raw["analytics.city"]),
        "delivery_type": build_strings(raw["analytics.delivery_type"]),
        "payment_type": build_strings(raw["analytics.payment_type_group_name"]),
        "is_premium": build_booleans(raw["analytics.is_premium"]),
        "is_legal": build_booleans(raw["analytics.is_legal"]),
        "customer_id": build_integers(raw["customer.customer_id"])[0],
        "cancel_reason_id": reason_id,
        "cancel_reason": cancel_reason,
        "cancellation_type": cancellation_type,
        "cancellation_initiator": initiator,
        "cancelled_by": build_cancelled_by(cancellation_type, initiator, cancelled),
        "cancelled_after_ship": build_booleans(raw["cancellation.cancelled_after_ship"]).where(
            cancelled
        ),
        "source_file": pd.Series([file] * len(lines), dtype="string"),
        "source_line": lines,
    }
    bad_dates = sum(int(bad.sum()) for _, bad in optional_dates.values())
    return build_canonical(pd.DataFrame(columns), POSTING_COLUMNS), bad_dates


def _build_item_frame(
    products: RawColumns,
    financial: RawColumns,
    numbers: pd.Series,
    prices: pd.Series,
    quantities: pd.Series,
) -> pd.DataFrame:
    """Canonical item rows (plus ``owner``) for the kept products, discounts joined by sku."""
    owners = products["owner"].astype(np.int64)
    items = pd.DataFrame(
        {
            "owner": owners,
            "posting_number": numbers.to_numpy()[owners],
            "line_no": products["position"].astype(np.int64),
            "sku": build_integers(products["sku"])[0],
            "offer_id": build_strings(products["offer_id"]),
            "name": build_strings(products["name"]),
            "quantity": quantities.reset_index(drop=True),
            "unit_price": prices.reset_index(drop=True),
            "currency_code": build_strings(products["currency_code"]),
        }
    )
    if len(financial["owner"]):
        old_price, _ = build_decimals(financial["old_price"])
        discounts = pd.DataFrame(
            {
                "owner": financial["owner"].astype(np.int64),
                "sku": build_integers(financial["product_id"])[0],
                # Ozon writes old_price 0 when there was no price before discounts.
                "old_price": old_price.where(old_price > 0),
                "discount_pct": build_decimals(financial["total_discount_percent"])[0],
                "has_promotion": pd.array(list(financial["has_promotion"]), dtype="boolean"),
            }
        ).dropna(subset=["sku"])
        discounts = discounts.drop_duplicates(["owner", "sku"])
        items = items.merge(discounts, on=["owner", "sku"], how="left", sort=False)
    return build_canonical(items, ITEM_COLUMNS).assign(owner=items["owner"].to_numpy())


def _combine_reasons(*columns: list[str | None]) -> list[str | None]:
    """Per record, the first reason in column order (the order the contract lists them)."""
    combined = list(columns[0])
    for column in columns[1:]:
        combined = [c if c is not None else r for c, r in zip(combined, column, strict=True)]
    return combined


def build_api_posting_batch(
    records: Sequence[Any],
    lines: Sequence[int],
    file: str,
    *,
    numbered: bool = False,
    scheme: str | None = None,
) -> PostingBatch:
    """Parse decoded Seller API posting objects into posting and item rows.

    ``lines`` gives each record's line (JSON Lines) or 1-based index in the file's list
    (``numbered``: reasons then start with "posting #k"). ``scheme`` forces "fbo"/"fbs" when
    the file's shape says which; otherwise a record without ``delivery_method`` and
    ``cancellation`` is taken as FBO. Unusable records become rejects, never exceptions.
    """
    return build_raw_posting_batch(
        RawPostings(records), lines, file, numbered=numbered, scheme=scheme
    )


def build_raw_posting_batch(
    raw: RawPostings,
    lines: Sequence[int],
    file: str,
    *,
    numbered: bool = False,
    scheme: str | None = None,
) -> PostingBatch:
    """``build_api_posting_batch`` for records already read by ``RawPostings``."""
    line_array = np.asarray(list(lines), dtype=np.int64)
    n_rows = len(raw.index)

    ordered_at, time_reasons = _order_time_reasons(raw.postings)
    owners = raw.products["owner"].astype(np.int64)
    prices, quantities, value_reasons = build_product_checks(
        raw.products["price"],
        raw.products["quantity"],
        owners,
        raw.products["position"].astype(np.int64) + 1,
        n_rows,
    )
    row_reasons = _combine_reasons(time_reasons, raw.product_reasons, value_reasons)
    record_index = np.asarray(raw.index, dtype=np.int64)
    for k, reason in enumerate(row_reasons):
        if reason is not None:
            raw.reasons[record_index[k]] = reason

    keep = np.asarray([r is None for r in row_reasons], dtype=bool)
    kept_index = record_index[keep]
    postings, bad_dates = _build_posting_frame(
        _select(raw.postings, keep),
        ordered_at[keep].reset_index(drop=True),
        file,
        line_array[kept_index],
        scheme,
    )
    postings[RECORD_SEQ] = kept_index

    # Owners are posting-row positions; re-number them to positions among kept rows.
    remap = np.cumsum(keep) - 1
    kept_products = keep[owners] if len(owners) else np.zeros(0, dtype=bool)
    financial = _select(raw.financial, keep[raw.financial["owner"].astype(np.int64)])
    if kept_products.any():
        products = _select(raw.products, kept_products)
        products["owner"] = remap[owners[kept_products]]
        financial["owner"] = remap[financial["owner"].astype(np.int64)]
        items = _build_item_frame(
            products,
            financial,
            postings["posting_number"],
            prices[kept_products],
            quantities[kept_products],
        )
        items[RECORD_SEQ] = kept_index[items.pop("owner").to_numpy()]
    else:
        items = empty_items()

    rejected = [i for i, reason in enumerate(raw.reasons) if reason is not None]
    prefix = (lambda i: f"posting #{line_array[i]}: ") if numbered else (lambda i: "")
    rejects = build_rejects(
        file, line_array[rejected], [prefix(i) + str(raw.reasons[i]) for i in rejected]
    )
    return PostingBatch(
        source=file,
        frame=postings,
        rejects=rejects,
        records_read=len(raw.reasons),
        unreadable_dates=bad_dates,
        items=items,
    )
