"""Probe requests a freshly loaded model is checked on before it serves.

Each probe is a request in the contract's shapes that exercises a different part of the feature
code (price log with a drop, a promotion and another currency; pushes of every used kind;
carrier scans; an FBO posting without analytics; offsets and decimal strings). They are built
around the model's own ``as_of`` and use keys its aggregates know, so the history lookups are
exercised too. :meth:`serving.scoring.ModelScorer.check_fast_path` scores them on both paths.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from core.model import RiskModel
from serving.scoring import ScoreJob

_HOUR = pd.Timedelta(hours=1)


def _iso(moment: pd.Timestamp) -> str:
    return moment.tz_convert("UTC").isoformat().replace("+00:00", "Z")


def _first_key(frame: pd.DataFrame | None, default: Any) -> Any:
    if frame is None or len(frame) == 0:
        return default
    value = frame["key"].iloc[0]
    return default if pd.isna(value) else value.item() if hasattr(value, "item") else value


def build_probe_jobs(
    model: RiskModel, now: pd.Timestamp | None = None
) -> tuple[list[ScoreJob], int]:
    """The probe requests and the moment (UTC ns) to score them at."""
    aggregates = model.aggregates
    as_of = aggregates.as_of_ if aggregates is not None else (now or pd.Timestamp.now(tz="UTC"))
    as_of = pd.Timestamp(as_of).tz_convert("UTC").floor("s")
    counts = aggregates.rate_counts_ if aggregates is not None else {}
    carrier = int(_first_key(counts.get("carrier"), 24))
    region = str(_first_key(counts.get("region"), "Москва"))
    sku = int(_first_key(counts.get("sku"), 1500000001))
    customer = int(
        _first_key(aggregates.customer_postings_ if aggregates is not None else None, 70000001)
    )
    ordered = as_of - 80 * _HOUR
    rich_number = "90000001-0001-1"
    rich = {
        "posting_number": rich_number,
        "order_id": 900000001,
        "status": "delivering",
        "in_process_at": _iso(ordered),
        "shipment_date": _iso(ordered + 48 * _HOUR),
        "delivering_date": _iso(ordered + 20 * _HOUR),
        "tracking_number": "PROBE1",
        "delivery_method": {"id": 1, "tpl_provider_id": carrier, "tpl_provider": "probe"},
        "cancellation": None,
        "customer": {"customer_id": customer},
        "products": [
            {
                "sku": sku,
                "offer_id": "PROBE-A",
                "quantity": 2,
                "price": "150.500000",
                "currency_code": "CNY",
            },
            {
                "sku": None,
                "offer_id": "PROBE-B",
                "quantity": 1,
                "price": 990,
                "currency_code": "RUB",
            },
        ],
        "analytics_data": {
            "region": region,
            "payment_type_group_name": "Банковская карта",
            "delivery_type": "PVZ",
            "is_premium": False,
            "is_legal": False,
            "delivery_date_begin": _iso(ordered + 200 * _HOUR),
            "delivery_date_end": _iso(ordered + 260 * _HOUR),
        },
    }
    rich_prices = [
        {
            "offer_id": "PROBE-A",
            "at": _iso(ordered - 30 * _HOUR),
            "price": "150.5",
            "currency_code": "CNY",
        },
        {
            "offer_id": "PROBE-A",
            "at": _iso(ordered + 5 * _HOUR),
            "price": "131.25",
            "old_price": "150.5",
            "currency_code": "CNY",
        },
        {
            "offer_id": "PROBE-A",
            "at": _iso(ordered + 5 * _HOUR),
            "price": 128.0,
            "currency_code": "CNY",
        },
        {
            "offer_id": "PROBE-A",
            "at": _iso(ordered + 40 * _HOUR),
            "price": "140",
            "currency_code": "RUB",
        },
        {
            "offer_id": "PROBE-B",
            "at": _iso(ordered + 10 * _HOUR),
            "price": 1000,
            "currency_code": "RUB",
        },
        {
            "offer_id": "PROBE-B",
            "at": _iso(as_of + 10 * _HOUR),
            "price": 10,
            "currency_code": "RUB",
        },
    ]
    rich_pushes = [
        {
            "message_type": "TYPE_NEW_POSTING",
            "posting_number": rich_number,
            "in_process_at": _iso(ordered),
        },
        {
            "message_type": "TYPE_STATE_CHANGED",
            "posting_number": rich_number,
            "new_state": "posting_in_carriage",
            "changed_state_date": _iso(ordered + 21 * _HOUR),
        },
        {
            "message_type": "TYPE_DELIVERY_DATE_CHANGED",
            "posting_number": rich_number,
            "received_at": _iso(ordered + 30 * _HOUR),
            "new_delivery_date_begin": _iso(ordered + 230 * _HOUR),
            "new_delivery_date_end": _iso(ordered + 290 * _HOUR),
            "old_delivery_date_begin": _iso(ordered + 200 * _HOUR),
            "old_delivery_date_end": _iso(ordered + 260 * _HOUR),
        },
        {
            "message_type": "TYPE_CREATE_OR_UPDATE_ITEM",
            "offer_id": "PROBE-A",
            "product_id": sku,
            "is_error": False,
            "changed_at": _iso(ordered + 12 * _HOUR),
        },
        {
            "message_type": "TYPE_CREATE_OR_UPDATE_ITEM",
            "offer_id": "PROBE-B",
            "is_error": False,
            "changed_at": _iso(ordered - 12 * _HOUR),
        },
        {"message_type": "TYPE_CHAT", "posting_number": rich_number},
        {
            "message_type": "TYPE_POSTING_CANCELLED",
            "posting_number": rich_number,
            "changed_state_date": _iso(as_of + 5 * _HOUR),
            "reason": {"id": 402},
        },
    ]
    rich_scans = [
        {"posting_number": rich_number, "at": _iso(ordered + 22 * _HOUR), "status": "accepted"},
        {"posting_number": rich_number, "at": _iso(ordered + 30 * _HOUR), "status": "sorted"},
        {"posting_number": "other-posting", "at": _iso(ordered - 50 * _HOUR), "status": "x"},
    ]
    sparse = {
        "posting_number": "90000002-0001-1",
        "status": "awaiting_packaging",
        "created_at": (ordered + 70 * _HOUR).tz_convert("Europe/Moscow").isoformat(),
        "products": [
            {
                "sku": 1,
                "offer_id": "PROBE-C",
                "quantity": 3,
                "price": "20.10",
                "currency_code": "XYZ",
            },
        ],
        "analytics_data": None,
        "customer": None,
    }
    fresh_number = "90000003-0001-1"
    fresh = {
        "posting_number": fresh_number,
        "status": "awaiting_deliver",
        "in_process_at": _iso(as_of - 2 * _HOUR),
        "delivery_method": {"tpl_provider_id": 987654},
        "products": [
            {
                "sku": sku,
                "offer_id": "PROBE-A",
                "quantity": 1,
                "price": 100.0,
                "currency_code": "CNY",
            },
        ],
        "analytics_data": {"region": "Probe region", "tpl_provider_id": carrier},
        "customer": {"customer_id": 1},
    }
    jobs = [
        ScoreJob(rich, rich_pushes, rich_prices, rich_scans),
        ScoreJob(sparse),
        ScoreJob(
            fresh,
            [
                {
                    "message_type": "TYPE_NEW_POSTING",
                    "posting_number": fresh_number,
                    "in_process_at": _iso(as_of - 2 * _HOUR),
                }
            ],
            [
                {
                    "offer_id": "PROBE-A",
                    "at": _iso(as_of - 1 * _HOUR),
                    "price": "90",
                    "currency_code": "CNY",
                }
            ],
        ),
    ]
    return jobs, int(as_of.value)
