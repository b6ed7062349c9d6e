"""What a posting's values mean and when they make it unusable: who cancelled, product lines.

Who cancelled a posting is read from its ``cancellation_type``, else its initiator's words
(:func:`build_cancelled_by`); a product's price and quantity are checked for many records at once
(:func:`build_product_checks`); an order time before ``EARLIEST_ORDER_AT`` is a placeholder
(:func:`build_early_order_mask`). The Seller API reader (``core.ingest.postings``) applies them
all, the seller cabinet's CSV reader (``core.ingest.cabinet``) the product checks, the order-time
bound and the same word normalisation, so that both formats reject a posting for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.ingest.values import (
    EARLIEST_ORDER_AT,
    as_object_series,
    build_decimals,
    build_integers,
    build_present_mask,
)

# cancellation_type -> cancelled_by. The API uses both client and customer for the buyer.
CANCELLATION_TYPES: dict[str, str] = {
    "client": "buyer",
    "customer": "buyer",
    "buyer": "buyer",
    "seller": "seller",
    "ozon": "ozon",
    "system": "system",
    "delivery": "delivery",
}

# cancellation_initiator words (lower case, ё as е) -> cancelled_by.
CANCELLATION_INITIATORS: dict[str, str] = {
    "клиент": "buyer",
    "покупатель": "buyer",
    "продавец": "seller",
    "ozon": "ozon",
    "озон": "ozon",
    "система": "system",
    "служба доставки": "delivery",
    "client": "buyer",
    "customer": "buyer",
    "seller": "seller",
    "system": "system",
    "delivery": "delivery",
}

# The most units one product line may hold. Real lines hold a few, wholesale ones thousands; a
# larger count is a unit mix-up or garbage, and would dominate every sum and mean of the order.
MAX_QUANTITY = 100_000


def normalise_words(text: pd.Series) -> pd.Series:
    """Lower-cased, trimmed, ё folded into е: the form word maps are keyed on."""
    return text.str.strip().str.lower().str.replace("ё", "е", regex=False)


def build_cancelled_by(
    cancellation_type: pd.Series, initiator: pd.Series, cancelled: np.ndarray
) -> pd.Series:
    """Who cancelled: from ``cancellation_type``, else the initiator words, else "unknown".

    NA for postings that were not cancelled.
    """
    who = pd.Series(pd.NA, index=cancellation_type.index, dtype="string")
    rows = np.flatnonzero(cancelled)
    if len(rows):
        by_type = normalise_words(cancellation_type.iloc[rows]).map(CANCELLATION_TYPES)
        by_words = normalise_words(initiator.iloc[rows]).map(CANCELLATION_INITIATORS)
        who.iloc[rows] = by_type.fillna(by_words).fillna("unknown").to_numpy()
    return who


def build_product_checks(
    prices: Sequence[Any] | pd.Series,
    quantities: Sequence[Any] | pd.Series,
    owners: np.ndarray,
    product_numbers: np.ndarray,
    n_records: int,
) -> tuple[pd.Series, pd.Series, list[str | None]]:
    """Validate product prices and quantities of many records at once.

    Returns the unit prices (float64), the quantities (Int64) and, per record, the reason for
    its first unusable product (``None`` when all are fine). A price must be a finite
    non-negative number and a quantity a positive integer of at most ``MAX_QUANTITY``.
    """
    raw_prices = as_object_series(prices)
    raw_quantities = as_object_series(quantities)
    price, price_bad = build_decimals(raw_prices)
    quantity, quantity_bad = build_integers(raw_quantities)
    price_given = build_present_mask(raw_prices)
    quantity_given = build_present_mask(raw_quantities)
    values = price.to_numpy()
    with np.errstate(invalid="ignore"):
        infinite = price.notna().to_numpy() & ~np.isfinite(values)
        negative = np.isfinite(values) & (values < 0)
    counts = quantity.fillna(1).to_numpy()
    not_positive = quantity.notna().to_numpy() & (counts <= 0)
    too_many = counts > MAX_QUANTITY
    price_unusable = ~price_given | price_bad | infinite | negative
    failing = price_unusable | ~quantity_given | quantity_bad | not_positive | too_many
    reasons: list[str | None] = [None] * n_records
    for k in np.flatnonzero(failing):
        owner = int(owners[k])
        if reasons[owner] is not None:
            continue
        no = int(product_numbers[k])
        if not price_given[k]:
            reasons[owner] = f"product {no} has no price"
        elif price_bad[k]:
            reasons[owner] = f"price '{raw_prices[k]}' of product {no} is not a number"
        elif infinite[k]:
            reasons[owner] = f"price '{raw_prices[k]}' of product {no} is not finite"
        elif negative[k]:
            reasons[owner] = f"price '{raw_prices[k]}' of product {no} is negative"
        elif not quantity_given[k]:
            reasons[owner] = f"product {no} has no quantity"
        elif too_many[k]:
            reasons[owner] = (
                f"quantity '{raw_quantities[k]}' of product {no} is more than "
                f"the {MAX_QUANTITY:,} units a product line may hold"
            )
        else:
            reasons[owner] = (
                f"quantity '{raw_quantities[k]}' of product {no} is not a positive integer"
            )
    return price, quantity, reasons


def build_early_order_mask(ordered_at: pd.Series) -> np.ndarray:
    """Order times before ``EARLIEST_ORDER_AT``: placeholders, not when the order was placed."""
    return (ordered_at < EARLIEST_ORDER_AT).to_numpy(dtype=bool, na_value=False)
