"""Writing a simulated shop as a seller's history directory, in the data contract's format.

Only what the seller's archive would hold at the export moment is written: the postings as the
Seller API returns them then, the pushes received until then, the price log, the carrier scans
and the product cards. ``truth.csv`` (optional) is the one file a real archive never has.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from simulator.shop import PENDING, SimulatedWorld
from simulator.world import (
    BUYER_CANCELLED,
    CARRIERS,
    DELIVERED,
    DELIVERY_CANCELLED,
    OPEN,
    OUTCOME_NAMES,
    OZON_CANCELLED,
    PAYMENT_TYPES,
    REGIONS,
    SELLER_CANCELLED,
)

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

SCAN_TEXTS = (
    "已揽收 Accepted by carrier",
    "Прибыло в сортировочный центр",
    "离开分拣中心 Departed sorting center",
    "Transit: border crossing",
    "Выпущено таможней",
    "运输中 In transit",
)
SCAN_PLACES = (
    "义乌 Yiwu",
    "乌鲁木齐 Urumqi",
    "Забайкальск",
    "Новосибирск",
    "Москва",
    "Екатеринбург",
)

CABINET_STATUS = {
    "awaiting_packaging": "Ожидает сборки",
    "awaiting_deliver": "Ожидает отгрузки",
    "delivering": "Доставляется",
    "delivered": "Доставлен",
    "cancelled": "Отменён",
}


def _iso(ts: pd.Timestamp | None) -> str | None:
    if ts is None or pd.isna(ts):
        return None
    return (
        ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if ts.microsecond
        else ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    )


def _stamps(world: SimulatedWorld, hours: np.ndarray) -> list[pd.Timestamp | None]:
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


def _posting_objects(world: SimulatedWorld) -> list[dict]:
    """Every posting ordered before the export moment, as the Seller API returns it then."""
    o, p, lines, cat = world.orders, world.postings, world.lines, world.catalogue
    rng = np.random.default_rng([world.config.seed, 2])
    status = _status(world)
    ordered = _stamps(world, p.ordered_h)
    deadline = _stamps(world, p.ordered_h + world.config.dynamics.shipping_deadline_hours)
    handed = _stamps(world, p.handed_h)
    begin = _stamps(world, p.promise_begin_h)
    end = _stamps(world, p.promise_end_h)
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
                "in_process_at": _iso(ordered[i]),
                "shipment_date": _iso(deadline[i]),
                "delivering_date": _iso(handed[i]),
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
                    "delivery_date_begin": _iso(begin[i]),
                    "delivery_date_end": _iso(end[i]),
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


def _push_rows(world: SimulatedWorld, objects: list[dict]) -> list[tuple[float, dict]]:
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
                        "changed_state_date": _iso(_stamps(world, np.array([hour]))[0]),
                        "reason": {
                            "id": obj["cancellation"]["cancel_reason_id"],
                            "message": obj["cancellation"]["cancel_reason"],
                        },
                    },
                )
            )
    for idx, at, state in rec.states:
        for i, hour, stamp in zip(idx, at, _stamps(world, at), strict=True):
            pushes.append(
                (
                    hour,
                    {
                        "message_type": "TYPE_STATE_CHANGED",
                        **base(int(i)),
                        "new_state": state,
                        "changed_state_date": _iso(stamp),
                    },
                )
            )
    for idx, at, old_begin, old_end, new_end in rec.date_changes:
        stamps = [_stamps(world, h) for h in (old_begin, old_end, new_end - 72.0, new_end)]
        for k, (i, hour) in enumerate(zip(idx, at, strict=True)):
            pushes.append(
                (
                    hour,
                    {
                        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
                        **base(int(i)),
                        "new_delivery_date_begin": _iso(stamps[2][k]),
                        "new_delivery_date_end": _iso(stamps[3][k]),
                        "old_delivery_date_begin": _iso(stamps[0][k]),
                        "old_delivery_date_end": _iso(stamps[1][k]),
                    },
                )
            )
    for idx, at in rec.card_edits:
        for offer, hour, stamp in zip(idx, at, _stamps(world, at), strict=True):
            pushes.append(
                (
                    hour,
                    {
                        "message_type": "TYPE_CREATE_OR_UPDATE_ITEM",
                        "offer_id": cat.offer_id[offer],
                        "product_id": int(cat.sku[offer]),
                        "is_error": False,
                        "changed_at": _iso(stamp),
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
                    "created_at": _iso(_stamps(world, np.array([hour]))[0]),
                    "seller_id": SELLER_ID,
                },
            )
        )
    pushes.sort(key=lambda item: item[0])
    return [(h, push) for h, push in pushes if h <= world.export_h]


def _price_rows(world: SimulatedWorld) -> pd.DataFrame:
    cat = world.catalogue
    start_rows = (
        np.arange(cat.offer_id.size),
        np.full(cat.offer_id.size, -24.0),
        cat.base_price,
        np.full(cat.offer_id.size, np.nan),
    )
    parts = [start_rows, *world.recorder.prices, *world.observed_prices]
    offer, at, price, old = (np.concatenate([part[k] for part in parts]) for k in range(4))
    frame = pd.DataFrame(
        {
            "hour": at,
            "offer_id": cat.offer_id[offer],
            "at": [_iso(s) for s in _stamps(world, at)],
            "price": np.round(price, 2),
            "old_price": np.round(old, 2),
            "currency_code": world.config.currency,
        }
    )
    frame = frame[frame["hour"] <= world.export_h].sort_values(["hour", "offer_id"], kind="stable")
    return frame.drop(columns="hour")


def _tracking_rows(world: SimulatedWorld) -> pd.DataFrame:
    rng = np.random.default_rng([world.config.seed, 3])
    idx = np.concatenate([s[0] for s in world.recorder.scans] or [np.array([], dtype=int)])
    at = np.concatenate([s[1] for s in world.recorder.scans] or [np.array([])])
    frame = pd.DataFrame(
        {
            "hour": at,
            "posting_number": world.orders.posting_number[idx],
            "at": [_iso(s) for s in _stamps(world, at)],
            "status": np.array(SCAN_TEXTS, dtype=object)[
                rng.integers(0, len(SCAN_TEXTS), idx.size)
            ],
            "location": np.array(SCAN_PLACES, dtype=object)[
                rng.integers(0, len(SCAN_PLACES), idx.size)
            ],
        }
    )
    return frame.sort_values(["hour", "posting_number"], kind="stable").drop(columns="hour")


def _product_objects(world: SimulatedWorld) -> list[dict]:
    cat = world.catalogue
    last_edit = np.full(cat.offer_id.size, -24.0 * 30)
    for idx, at in world.recorder.card_edits:
        np.maximum.at(last_edit, idx, at)
    created = _stamps(world, np.full(cat.offer_id.size, -24.0 * 60))
    updated = _stamps(world, last_edit)
    return [
        {
            "offer_id": cat.offer_id[k],
            "sku": int(cat.sku[k]),
            "name": cat.name[k],
            "description_category_id": int(cat.category_id[k]),
            "type_id": 90_000 + int(cat.category_id[k]) % 100,
            "created_at": _iso(created[k]),
            "updated_at": _iso(updated[k]),
        }
        for k in range(cat.offer_id.size)
    ]


def _cabinet_date(value: str | None) -> str:
    """The cabinet's naive Moscow-time format."""
    if not value:
        return ""
    moscow = pd.Timestamp(value).tz_convert("Europe/Moscow")
    return moscow.strftime("%Y-%m-%d %H:%M:%S")


CABINET_HEADER = [
    "Номер заказа",
    "Номер отправления",
    "Принят в обработку",
    "Дата отгрузки",
    "Дата отгрузки без просрочки",
    "Статус",
    "Дата доставки",
    "Фактическая дата передачи в доставку",
    "Дата отмены",
    "Сумма отправления",
    "Код валюты отправления",
    "Название товара",
    "Цвет товара",
    "Размер товара",
    "SKU",
    "Артикул",
    "Ваша цена",
    "Код валюты товара",
    "Оплачено покупателем",
    "Код валюты покупателя",
    "Количество",
    "Стоимость доставки",
    "Связанные отправления",
    "Выкуп товара",
    "Цена товара до скидок",
    "Скидка %",
    "Скидка руб",
    "Акции",
    "Подъем на этаж",
    "Кластер отгрузки",
    "Кластер доставки",
    "Регион доставки",
    "Город доставки",
    "Способ доставки",
    "Склад отгрузки",
    "Способ отгрузки",
    "Перевозчик",
]


def _write_cabinet_csv(world: SimulatedWorld, objects: list[dict], path: Path) -> None:
    p = world.postings
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, delimiter=";", quoting=csv.QUOTE_ALL)
        writer.writerow(CABINET_HEADER)
        for i, obj in enumerate(objects):
            delivered = (
                _iso(_stamps(world, np.array([p.closed_h[i]]))[0])
                if obj["status"] == "delivered"
                else None
            )
            cancelled = (
                _iso(_stamps(world, np.array([p.closed_h[i]]))[0])
                if obj["status"] == "cancelled"
                else None
            )
            total = sum(float(x["price"]) * x["quantity"] for x in obj["products"])
            analytics = obj["analytics_data"]
            for product, fin in zip(
                obj["products"], obj["financial_data"]["products"], strict=True
            ):
                writer.writerow(
                    [
                        obj["order_number"],
                        obj["posting_number"],
                        _cabinet_date(obj["in_process_at"]),
                        _cabinet_date(obj["shipment_date"]),
                        _cabinet_date(obj["shipment_date"]),
                        CABINET_STATUS[obj["status"]],
                        _cabinet_date(delivered),
                        _cabinet_date(obj["delivering_date"]),
                        _cabinet_date(cancelled),
                        f"{total:.2f}",
                        product["currency_code"],
                        product["name"],
                        "",
                        "",
                        product["sku"],
                        product["offer_id"],
                        product["price"][:-4],
                        product["currency_code"],
                        product["price"][:-4],
                        product["currency_code"],
                        product["quantity"],
                        "0",
                        "",
                        "",
                        f"{fin['old_price']:.2f}",
                        fin["total_discount_percent"],
                        f"{fin['old_price'] - fin['price']:.2f}",
                        ", ".join(fin["actions"]),
                        "",
                        "Китай",
                        analytics["region"],
                        analytics["region"],
                        analytics["city"],
                        analytics["delivery_type"],
                        WAREHOUSE,
                        "rFBS",
                        analytics["tpl_provider"],
                    ]
                )


def _truth_frame(world: SimulatedWorld) -> pd.DataFrame:
    truth = world.truth
    index = truth["posting"].to_numpy()
    outcome = world.final.outcome[index]
    closed = world.final.closed_h[index]
    label = np.where(outcome == BUYER_CANCELLED, "1", np.where(outcome == DELIVERED, "0", ""))
    return pd.DataFrame(
        {
            "posting_number": world.orders.posting_number[index],
            "as_of": _iso(world.timestamp(np.array([world.export_h]))[0]),
            "true_probability": np.round(truth["true_probability"].to_numpy(), 6),
            "outcome": [OUTCOME_NAMES[int(k)] for k in outcome],
            "outcome_at": [_iso(s) for s in _stamps(world, closed)],
            "label": label,
        }
    )


def _write_jsonl(path: Path, objects) -> None:
    with path.open("wb") as handle:
        for obj in objects:
            handle.write(orjson.dumps(obj))
            handle.write(b"\n")


def write_history(
    world: SimulatedWorld, out: Path | str, *, posting_format: str = "jsonl", truth: bool = False
) -> list[Path]:
    """Write the shop's history directory (and ``truth.csv``); returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    objects = _posting_objects(world)
    written = []
    if posting_format == "jsonl":
        written.append(out / "postings.jsonl")
        _write_jsonl(written[-1], objects)
    elif posting_format == "csv":
        written.append(out / "orders.csv")
        _write_cabinet_csv(world, objects, written[-1])
    else:
        raise ValueError(f"posting_format must be 'jsonl' or 'csv', not {posting_format!r}")
    written.append(out / "pushes.jsonl")
    _write_jsonl(written[-1], (push for _, push in _push_rows(world, objects)))
    written.append(out / "prices.csv")
    _price_rows(world).to_csv(written[-1], index=False)
    written.append(out / "tracking.csv")
    _tracking_rows(world).to_csv(written[-1], index=False)
    written.append(out / "products.jsonl")
    _write_jsonl(written[-1], _product_objects(world))
    if truth:
        if world.truth is None:
            raise ValueError("the world was simulated without truth=True")
        written.append(out / "truth.csv")
        _truth_frame(world).to_csv(written[-1], index=False)
    return written
