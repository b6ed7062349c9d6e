"""One pass over Seller API posting objects: their shape checked, their used fields read as rows.

:class:`RawPostings` reads each record once (one pass per record costs a fraction of one pass per
field over a large list of dicts) into three kinds of row tuples, postings, their products and
their financial lines, and transposes each into raw object columns (:data:`RawColumns`), which
``core.ingest.postings`` converts vectorised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

_EMPTY: dict[str, Any] = {}


def _obj(value: Any) -> dict[str, Any]:
    """A sub-object, or an empty one when it is null or not an object (never mutated)."""
    return value if type(value) is dict else _EMPTY


# Fields read from each posting, in row order. FBO postings lack delivery_method and
# cancellation but carry cancel_reason_id and created_at at the top level.
_TOP_FIELDS = (
    "posting_number",
    "order_id",
    "order_number",
    "status",
    "in_process_at",
    "created_at",
    "shipment_date",
    "delivering_date",
    "tracking_number",
    "cancel_reason_id",
)
_METHOD_FIELDS = ("id", "name", "warehouse_id", "tpl_provider_id", "tpl_provider")
_ANALYTICS_FIELDS = (
    "warehouse_id",
    "tpl_provider_id",
    "tpl_provider",
    "region",
    "city",
    "delivery_type",
    "payment_type_group_name",
    "is_premium",
    "is_legal",
    "delivery_date_begin",
    "delivery_date_end",
)
_CANCELLATION_FIELDS = (
    "cancel_reason_id",
    "cancel_reason",
    "cancellation_type",
    "cancellation_initiator",
    "cancelled_after_ship",
)
POSTING_FIELDS = (
    *_TOP_FIELDS,
    *(f"method.{k}" for k in _METHOD_FIELDS),
    *(f"analytics.{k}" for k in _ANALYTICS_FIELDS),
    *(f"cancellation.{k}" for k in _CANCELLATION_FIELDS),
    "customer.customer_id",
    "has_fbs_objects",
)
_PRODUCT_FIELDS = ("price", "quantity", "sku", "offer_id", "name", "currency_code")
PRODUCT_FIELDS = ("owner", "position", *_PRODUCT_FIELDS)
_FINANCIAL_FIELDS = ("product_id", "old_price", "total_discount_percent")
FINANCIAL_FIELDS = ("owner", *_FINANCIAL_FIELDS, "has_promotion")


def _structural_reason(record: Any) -> str | None:
    if type(record) is not dict:
        return "not a JSON object"
    number = record.get("posting_number")
    if type(number) is int or (type(number) is str and number.strip()):
        return None
    return "no posting_number"


# Raw columns: one object array per field, as read from the records.
RawColumns = dict[str, np.ndarray]


def _columns(rows: list[tuple[Any, ...]], names: tuple[str, ...]) -> RawColumns:
    """Row tuples transposed into raw object columns.

    ``np.fromiter`` keeps a list-valued field as one element (``np.array`` would make it a
    dimension) and avoids a DataFrame, whose construction costs more than the whole read.
    """
    if not rows:
        return {name: np.empty(0, dtype=object) for name in names}
    transposed = zip(*rows, strict=True)
    return {
        name: np.fromiter(column, dtype=object, count=len(rows))
        for name, column in zip(names, transposed, strict=True)
    }


class RawPostings:
    """What one pass over the records reads: raw posting, product and financial rows.

    The loop is written out in one body on purpose: it runs once per posting, and helper
    calls per record would double its cost. ``records`` may be a lazy iterable: a record is
    read right after it is made, while its objects are still in the CPU cache, and a reader
    that decodes it on the fly can free it before the next one (see
    ``core.ingest.jsonlines.DecodedLines``).
    """

    def __init__(self, records: Iterable[Any]) -> None:
        self.reasons: list[str | None] = []  # per record, shape problems
        self.index: list[int] = []  # record index of each posting row
        self.product_reasons: list[str | None] = []  # per posting row
        rows: list[tuple[Any, ...]] = []
        product_rows: list[tuple[Any, ...]] = []
        financial_rows: list[tuple[Any, ...]] = []
        for i, record in enumerate(records):
            reason = _structural_reason(record)
            self.reasons.append(reason)
            if reason is not None:
                continue
            get = record.get
            k = len(rows)
            method = get("delivery_method")
            analytics = get("analytics_data")
            cancellation = get("cancellation")
            customer = get("customer")
            rows.append(
                (
                    *map(get, _TOP_FIELDS),
                    *map(_obj(method).get, _METHOD_FIELDS),
                    *map(_obj(analytics).get, _ANALYTICS_FIELDS),
                    *map(_obj(cancellation).get, _CANCELLATION_FIELDS),
                    _obj(customer).get("customer_id"),
                    "delivery_method" in record or "cancellation" in record,
                )
            )
            self.index.append(i)

            products = get("products")
            reason = None if type(products) is list and products else "no products"
            for j, product in enumerate(products if reason is None else ()):
                if type(product) is dict:
                    product_rows.append((k, j, *map(product.get, _PRODUCT_FIELDS)))
                elif reason is None:
                    reason = f"product {j + 1} is not an object"
            self.product_reasons.append(reason)

            financial = _obj(get("financial_data")).get("products")
            for product in financial if type(financial) is list else ():
                if type(product) is dict:
                    actions = product.get("actions")
                    promoted = len(actions) > 0 if type(actions) is list else None
                    financial_rows.append((k, *map(product.get, _FINANCIAL_FIELDS), promoted))
        self.postings = _columns(rows, POSTING_FIELDS)
        self.products = _columns(product_rows, PRODUCT_FIELDS)
        self.financial = _columns(financial_rows, FINANCIAL_FIELDS)
