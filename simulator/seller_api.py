"""The simulated shop as the Seller API and its webhook show it at the export moment.

:func:`posting_objects` gives every posting ordered before the export moment as the Seller API
returns it then (its delivery method, analytics and financial data and, once cancelled, its
cancellation); :func:`push_rows` every push the webhook received until then. Times are
written as the API writes them (:func:`iso_time`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from simulator.parameters import (
    BUYER_CANCELLED,
    CARRIERS,
    DELIVERED,
    DELIVERY_CANCELLED,
    OPEN,
    OZON_CANCELLED,
    PAYMENT_TYPES,
    REGIONS,
    SELLER_CANCELLED,
)
from simulator.shop import PENDING, SimulatedWorld

SELLER_ID = 2_118_334
WAREHOUSE_ID = 1_020_000_456_789
WAREHOUSE = "义乌仓 Yiwu"
RUB_PER = {"CNY": 12.5, "RUB": 1.0}

# cancellation object by outcome: reason id, reason, type(s), initiator(s)
CANCELLATIONS = {
    BUYER_CANCELLED: (
        (402, "Покупатель отменил заказ"),
        ("client", "customer"),
        ("Клиент", "Покупатель"),
    ),
    SELLER_CANCELLED: ((352, "Товар закончился у продавца"), ("seller",), ("Продавец",)),
    OZON_CANCELLED: ((400, "Отправление не передано в доставку вовремя"), ("ozon",), ("Ozon",)),
    DELIVERY_CANCELLED: ((690, "Утеряно службой доставки"), ("delivery",), ("Служба доставки",)),
}


def iso_time(ts: pd.Timestamp | None) -> str | None:
    if ts is None or pd.isna(ts):
        return None
    return (
        ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if ts.microsecond
        else ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    )


def hour_stamps(world: SimulatedWorld, hours: np.ndarray) -> list[pd.Timestamp | None]:
    """Hours to timestamps rounded to the millisecond, NaN to None."""
    stamps = world.timestamp(hours).round("ms")
    return [None if pd.isna(s) else s for s in stamps]


def _status(world: SimulatedWorld) -> np.ndarray:
    p = world.postings
    age = world.export_h - p.ordered_h
    handed = ~np.isnan(p.handed_h)
    open_status = np.where(
        handed, "delivering", np.where(age < 20, "awaiting_packaging", "awaiting_deliver")
    )
    status = np.where(p.outcome == DELIVERED, "delivered", "cancelled")
    return np.where((p.outcome == OPEN) | (p.outcome == PENDING), open_status, status)


def posting_objects(world: SimulatedWorld) -> list[dict]:
    """Every posting ordered before the export moment, as the Seller API returns it then."""
    o, p, lines, cat = world.orders, world.postings, world.lines, world.catalogue
    rng = np.random.default_rng([world.config.seed, 2])
    status = _status(world)
    ordered = hour_stamps(world, p.ordered_h)
    deadline = hour_stamps(world, p.ordered_h + world.config.dynamics.shipping_deadline_hours)
    handed = hour_stamps(world, p.handed_h)
    begin = hour_stamps(world, p.promise_begin_h)
    end = hour_stamps(world, p.promise_end_h)
    currency = world.config.currency
    by_posting = np.split(np.arange(len(lines.posting)), np.flatnonzero(np.diff(lines.posting)) + 1)
    choice = rng.integers(0, 2, len(p.ordered_h))
    legal = rng.random(len(p.ordered_h)) < 0.02
    objects = []
    for i in range(len(p.ordered_h)):
        carrier = CARRIERS[p.carrier[i]]
        region = REGIONS[p.region[i]]
        products, financial = [], []
        for li in by_posting[i]:
            offer = lines.offer[li]
            paid, regular = float(lines.paid[li]), float(lines.list_at_purchase[li])
            promo = bool(lines.promo_at_purchase[li])
            products.append(
                {
                    "price": f"{paid:.6f}",
                    "currency_code": currency,
                    "offer_id": cat.offer_id[offer],
                    "name": cat.name[offer],
                    "sku": int(cat.sku[offer]),
                    "quantity": int(lines.quantity[li]),
                    "is_marketplace_buyout": False,
                }
            )
            financial.append(
                {
                    "product_id": int(cat.sku[offer]),
                    "price": paid,
                    "old_price": regular if promo else paid,
                    "total_discount_percent": round(100 * (1 - paid / regular), 2) if promo else 0,
                    "actions": ["Распродажа недели"] if promo else [],
                    "currency_code": currency,
                }
            )
        cancellation = {
            "cancel_reason_id": 0,
            "cancel_reason": "",
            "cancellation_type": "",
            "cancelled_after_ship": False,
            "affect_cancellation_rating": False,
            "cancellation_initiator": "",
        }
        if status[i] == "cancelled":
            (reason_id, reason), types, initiators = CANCELLATIONS[int(p.outcome[i])]
            cancellation = {
                "cancel_reason_id": reason_id,
                "cancel_reason": reason,
                "cancellation_type": types[choice[i] % len(types)],
                "cancelled_after_ship": bool(handed[i] is not None),
                "affect_cancellation_rating": int(p.outcome[i]) == SELLER_CANCELLED,
                "cancellation_initiator": initiators[choice[i] % len(initiators)],
            }
        objects.append(
            {
                "posting_number": o.posting_number[i],
                "order_id": int(o.order_id[i]),
                "order_number": o.order_number[i],
                "status": str(status[i]),
                "substatus": "",
                "delivery_method": {
                    "id": 21_000_000_000 + int(carrier.tpl_provider_id),
                    "name": f"{carrier.name}, {WAREHOUSE}",
                    "warehouse_id": WAREHOUSE_ID,
                    "warehouse": WAREHOUSE,
                    "tpl_provider_id": carrier.tpl_provider_id,
                    "tpl_provider": carrier.name,
                },
                "tracking_number": f"OZ{o.order_id[i]}CN" if handed[i] is not None else "",
                "tpl_integration_type": "non_integrated",
                "in_process_at": iso_time(ordered[i]),
                "shipment_date": iso_time(deadline[i]),
                "delivering_date": iso_time(handed[i]),
                "cancellation": cancellation,
                "customer": {
                    "customer_id": int(o.customer_id[i]),
                    "name": f"Покупатель {int(o.customer_id[i]) % 9973}",
                    "phone": f"+7900{int(o.customer_id[i]) % 10_000_000:07d}",
                    "address": {"city": region.city, "region": region.name},
                },
                "products": products,
                "analytics_data": {
                    "region": region.name,
                    "city": region.city,
                    "delivery_type": "Courier" if p.courier[i] else "PVZ",
                    "is_premium": bool(p.premium[i]),
                    "payment_type_group_name": PAYMENT_TYPES[int(o.payment[i])],
                    "warehouse_id": WAREHOUSE_ID,
                    "warehouse": WAREHOUSE,
                    "tpl_provider_id": carrier.tpl_provider_id,
                    "tpl_provider": carrier.name,
                    "delivery_date_begin": iso_time(begin[i]),
                    "delivery_date_end": iso_time(end[i]),
                    "is_legal": bool(legal[i]),
                },
                "financial_data": {
                    "cluster_from": "Китай",
                    "cluster_to": region.name,
                    "products": financial,
                },
                "is_express": False,
            }
        )
    return objects


def push_rows(world: SimulatedWorld, objects: list[dict]) -> list[tuple[float, dict]]:
    """Every push the webhook received until the export moment, with its hour for sorting."""
    o, p, rec, cat = world.orders, world.postings, world.recorder, world.catalogue
    pushes: list[tuple[float, dict]] = []

    def base(i: int) -> dict:
        return {
            "posting_number": o.posting_number[i],
            "warehouse_id": WAREHOUSE_ID,
            "seller_id": SELLER_ID,
        }

    for i, obj in enumerate(objects):
        pushes.append(
            (
                p.ordered_h[i],
                {
                    "message_type": "TYPE_NEW_POSTING",
                    **base(i),
                    "products": [
                        {"sku": x["sku"], "quantity": x["quantity"]} for x in obj["products"]
                    ],
                    "in_process_at": obj["in_process_at"],
                },
            )
        )
        if obj["status"] == "cancelled":
            hour = p.closed_h[i]
            pushes.append(
                (
                    hour,
                    {
                        "message_type": "TYPE_POSTING_CANCELLED",
                        **base(i),
                        "products": [
                            {"sku": x["sku"], "quantity": x["quantity"]} for x in obj["products"]
                        ],
                        "old_state": "posting_in_carriage"
                        if obj["delivering_date"]
                        else "posting_created",
                        "new_state": "posting_canceled",
                        "changed_state_date": iso_time(hour_stamps(world, np.array([hour]))[0]),
                        "reason": {
                            "id": obj["cancellation"]["cancel_reason_id"],
                            "message": obj["cancellation"]["cancel_reason"],
                        },
                    },
                )
            )
    for idx, at, state in rec.states:
        for i, hour, stamp in zip(idx, at, hour_stamps(world, at), strict=True):
            pushes.append(
                (
                    hour,
                    {
                        "message_type": "TYPE_STATE_CHANGED",
                        **base(int(i)),
                        "new_state": state,
                        "changed_state_date": iso_time(stamp),
                    },
                )
            )
    for idx, at, old_begin, old_end, new_end in rec.date_changes:
        stamps = [hour_stamps(world, h) for h in (old_begin, old_end, new_end - 72.0, new_end)]
        for k, (i, hour) in enumerate(zip(idx, at, strict=True)):
            pushes.append(
                (
                    hour,
                    {
                        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
                        **base(int(i)),
                        "new_delivery_date_begin": iso_time(stamps[2][k]),
                        "new_delivery_date_end": iso_time(stamps[3][k]),
                        "old_delivery_date_begin": iso_time(stamps[0][k]),
                        "old_delivery_date_end": iso_time(stamps[1][k]),
                    },
                )
            )
    for idx, at in rec.card_edits:
        for offer, hour, stamp in zip(idx, at, hour_stamps(world, at), strict=True):
            pushes.append(
                (
                    hour,
                    {
                        "message_type": "TYPE_CREATE_OR_UPDATE_ITEM",
                        "offer_id": cat.offer_id[offer],
                        "product_id": int(cat.sku[offer]),
                        "is_error": False,
                        "changed_at": iso_time(stamp),
                        "seller_id": SELLER_ID,
                    },
                )
            )
    # The webhook also receives messages the predictor does not use.
    for day in range(0, world.config.days, 3):
        hour = day * 24.0 + 11.0
        pushes.append(
            (
                hour,
                {
                    "message_type": "TYPE_CHAT_NEW_MESSAGE",
                    "chat_id": f"chat-{day}",
                    "chat_type": "Buyer_Seller",
                    "created_at": iso_time(hour_stamps(world, np.array([hour]))[0]),
                    "seller_id": SELLER_ID,
                },
            )
        )
    pushes.sort(key=lambda item: item[0])
    return [(h, push) for h, push in pushes if h <= world.export_h]
