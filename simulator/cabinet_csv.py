"""The simulated shop's postings as the seller cabinet's CSV export: one row per product line.

The cabinet writes its dates as naive Moscow time, its statuses in Russian and its file in UTF-8
with a byte-order mark, ``;``-separated and every cell quoted (:data:`CABINET_HEADER` names the
columns).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.seller_api import WAREHOUSE, hour_stamps, iso_time
from simulator.shop import SimulatedWorld

CABINET_STATUS = {
    "awaiting_packaging": "Ожидает сборки",
    "awaiting_deliver": "Ожидает отгрузки",
    "delivering": "Доставляется",
    "delivered": "Доставлен",
    "cancelled": "Отменён",
}


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


def write_cabinet_csv(world: SimulatedWorld, objects: list[dict], path: Path) -> None:
    p = world.postings
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, delimiter=";", quoting=csv.QUOTE_ALL)
        writer.writerow(CABINET_HEADER)
        for i, obj in enumerate(objects):
            delivered = (
                iso_time(hour_stamps(world, np.array([p.closed_h[i]]))[0])
                if obj["status"] == "delivered"
                else None
            )
            cancelled = (
                iso_time(hour_stamps(world, np.array([p.closed_h[i]]))[0])
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
