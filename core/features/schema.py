"""What the features are: their names by family, their version, and the constants they share.

The model, the encoder and the reports read these names; :mod:`core.features.families` computes
the columns.
"""

from __future__ import annotations

from core.columns import (
    Array,
)

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
