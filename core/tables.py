"""The normalised history tables every reader produces and every consumer reads.

A seller's archive arrives in many shapes (API pages, JSON Lines, the cabinet CSV, webhook
pushes, a price log, carrier scans). Ingestion turns all of them into the four tables below;
features, labels, the simulator's round-trip tests, the REST service and the nightly batch
all speak only of these.

Timestamps are timezone-aware UTC (``datetime64[ns, UTC]``) and their columns end in ``_at``.
Ids are nullable integers (``Int64``), free text is kept for display only (key on ids).

The posting table is a snapshot taken at export time: its ``status`` and ``cancel*`` fields are
the *final* state, so features must never read them; ``cancelled_at``/``delivered_at`` are the
resolved closing times and may be used only through an explicit ``<= as_of`` check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

UTC_TS = "datetime64[ns, UTC]"

# column -> dtype. The order is the canonical column order.
POSTING_COLUMNS: dict[str, str] = {
    "posting_number": "string",
    "order_id": "Int64",
    "order_number": "string",
    "scheme": "string",  # "fbs" (incl. rFBS), "fbo", or "cabinet_csv"
    "status": "string",  # API status at export time; cabinet statuses mapped to API codes
    "ordered_at": UTC_TS,  # in_process_at (FBO: created_at when in_process_at is missing)
    "shipment_deadline_at": UTC_TS,  # shipment_date: hand over before this
    "handed_over_at": UTC_TS,  # delivering_date: handed to delivery
    "tracking_number": "string",  # NA when "" in the source
    "delivery_method_id": "Int64",
    "delivery_method_name": "string",
    "warehouse_id": "Int64",
    "carrier_id": "Int64",  # tpl_provider_id (delivery_method, else analytics_data)
    "carrier_name": "string",
    "region": "string",
    "city": "string",
    "delivery_type": "string",
    "payment_type": "string",  # analytics_data.payment_type_group_name
    "is_premium": "boolean",
    "is_legal": "boolean",
    "promised_delivery_begin_at": UTC_TS,  # latest known promise, as exported
    "promised_delivery_end_at": UTC_TS,
    "customer_id": "Int64",
    "cancel_reason_id": "Int64",
    "cancel_reason": "string",
    "cancellation_type": "string",  # raw: client/customer/seller/ozon/system/delivery
    "cancellation_initiator": "string",  # raw Russian words
    "cancelled_by": "string",  # see CANCELLED_BY; NA when not cancelled
    "cancelled_after_ship": "boolean",
    "cancelled_at": UTC_TS,  # TYPE_POSTING_CANCELLED push, or «Дата отмены»
    "delivered_at": UTC_TS,  # posting_delivered/posting_received push, or «Дата доставки»
    "source_file": "string",
    "source_line": "Int64",
}

# One row per product line of a posting.
ITEM_COLUMNS: dict[str, str] = {
    "posting_number": "string",
    "line_no": "Int64",  # 0-based position in products[]
    "sku": "Int64",
    "offer_id": "string",
    "name": "string",
    "quantity": "Int64",
    "unit_price": "float64",  # price paid per unit, in currency_code
    "currency_code": "string",
    "old_price": "float64",  # price before discounts, when known (financial_data / CSV)
    "discount_pct": "float64",  # total discount percent, when known
    "has_promotion": "boolean",  # the sale price came from a promotion (actions non-empty)
}

# One time-stamped table for everything that happens; `kind` says which columns are filled.
EVENT_KINDS = (
    "state_change",  # posting: TYPE_STATE_CHANGED (state = new_state) / TYPE_NEW_POSTING
    "cancellation",  # posting: TYPE_POSTING_CANCELLED (reason_id, reason)
    "delivery_date_change",  # posting: TYPE_DELIVERY_DATE_CHANGED (new and old promise)
    "card_edit",  # offer: TYPE_CREATE_OR_UPDATE_ITEM (offer_id, sku = product_id)
    "price",  # offer: prices.csv row (price, old_price, currency_code)
    "carrier_scan",  # posting: tracking.csv row (state = status, location)
)

# Event kinds that arrive as webhook pushes: any of them shows the seller archives pushes.
PUSH_KINDS = ("state_change", "cancellation", "delivery_date_change", "card_edit")
SCAN_KINDS = ("carrier_scan",)

EVENT_COLUMNS: dict[str, str] = {
    "at": UTC_TS,
    "kind": "string",
    "posting_number": "string",  # posting events
    "offer_id": "string",  # offer events (price, card_edit)
    "sku": "Int64",  # card_edit: product_id from the push
    "state": "string",  # state_change: new_state; carrier_scan: status
    "location": "string",  # carrier_scan
    "price": "float64",  # price
    "old_price": "float64",  # price
    "currency_code": "string",  # price
    "delivery_begin_at": UTC_TS,  # delivery_date_change: new promise
    "delivery_end_at": UTC_TS,
    "old_delivery_begin_at": UTC_TS,  # delivery_date_change: promise before the change
    "old_delivery_end_at": UTC_TS,
    "reason_id": "Int64",  # cancellation
    "reason": "string",
    "source_file": "string",
    "source_line": "Int64",
}

# Optional product cards (products.jsonl).
PRODUCT_COLUMNS: dict[str, str] = {
    "offer_id": "string",
    "sku": "Int64",
    "name": "string",
    "description_category_id": "Int64",
    "type_id": "Int64",
    "created_at": UTC_TS,
    "updated_at": UTC_TS,
}

REJECT_COLUMNS: dict[str, str] = {
    "file": "string",
    "line": "Int64",  # 1-based line (JSON Lines, CSV data rows counted from the header = 1)
    "reason": "string",
}

# Who cancelled, normalised. Only "buyer" is a positive for the model.
CANCELLED_BY = ("buyer", "seller", "ozon", "system", "delivery", "unknown")

# API statuses after which a posting is no longer open.
TERMINAL_STATUSES = frozenset({"delivered", "cancelled"})


def empty_frame(columns: dict[str, str]) -> pd.DataFrame:
    """An empty frame with the canonical columns and dtypes."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def conform(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Return ``frame`` with exactly the canonical columns, in order, with canonical dtypes.

    Missing columns are added as all-NA; extra columns are dropped.
    """
    out = {}
    n = len(frame)
    for name, dtype in columns.items():
        if name in frame.columns:
            col = frame[name]
            if dtype == UTC_TS:
                col = pd.to_datetime(col, utc=True).astype(UTC_TS)
            else:
                col = col.astype(dtype)
            out[name] = col.reset_index(drop=True)
        else:
            out[name] = pd.Series(index=pd.RangeIndex(n), dtype=dtype)
    return pd.DataFrame(out)


@dataclass
class LoadReport:
    """What a load read, kept and rejected. Nothing is dropped without being counted here."""

    postings_read: int = 0  # posting records seen (lines, array elements, CSV postings)
    postings_kept: int = 0  # distinct postings in the table
    postings_rejected: int = 0
    duplicates_merged: int = 0  # records folded into a posting seen before
    files_read: dict[str, int] = field(default_factory=dict)  # file -> records read
    missing_optional: list[str] = field(default_factory=list)  # optional files not present
    warnings: list[str] = field(default_factory=list)


@dataclass
class HistoryTables:
    """A seller's history, normalised. See the module docstring for the column contracts."""

    postings: pd.DataFrame
    items: pd.DataFrame
    events: pd.DataFrame
    products: pd.DataFrame
    rejects: pd.DataFrame
    report: LoadReport = field(default_factory=LoadReport)

    @classmethod
    def empty(cls) -> HistoryTables:
        return cls(
            postings=empty_frame(POSTING_COLUMNS),
            items=empty_frame(ITEM_COLUMNS),
            events=empty_frame(EVENT_COLUMNS),
            products=empty_frame(PRODUCT_COLUMNS),
            rejects=empty_frame(REJECT_COLUMNS),
        )

    def latest_event_at(self) -> pd.Timestamp | None:
        """The export moment: the latest timestamp anywhere in the history."""
        candidates = [
            self.events["at"].max(),
            self.postings["ordered_at"].max(),
            self.postings["handed_over_at"].max(),
            self.postings["cancelled_at"].max(),
            self.postings["delivered_at"].max(),
        ]
        known = [c for c in candidates if pd.notna(c)]
        return max(known) if known else None
