"""The seller dashboard's pages for a shop with 100,000 open orders: how fast the server answers.

For each book engine (SQLite, a file in a temporary directory; PostgreSQL, a server of its own
started here from Debian's package, :mod:`benchmarks.postgres`):

1. **A full book.** A fresh book (:class:`live.book.OrderBook` migrates it) filled with
   ``--open`` open postings and about a tenth as many closed ones, in chunks of bulk inserts
   (SQLAlchemy Core ``insert`` executemany) setting the columns :func:`live.book.accept_posting`
   and :func:`live.book.record_scores` set: the posting object (Seller API form, ~20 carriers,
   ~80 regions, 4 payment types, order times over 30 days; its dashboard columns from
   :func:`live.book.posting_facets`), its offers, and one stored score whose explanations are
   those of the playbook in en/zh/ru (reasons with shares, risk drops and facts, actions,
   decision, expected saving: 1-2 KB of JSON). Some open postings wait for a re-score, some
   are not scored yet. The book's clock is the newest order time plus one day. PostgreSQL's
   tables are then analysed, as its autovacuum would have done; SQLite's are not (the book
   never runs ``ANALYZE``).
2. **The pages.** ``cancel-risk serve --live`` on loopback against that book
   (``CANCEL_RISK_WORKER=false``: nothing re-scores meanwhile; ``CANCEL_RISK_CLOCK=events``);
   a login through ``POST /ui/login`` (httpx, the session cookie kept), three warm-up requests
   of each page, then ``--repeats`` rounds of: the first page ``/ui``; ``/ui?risk=high``; one
   carrier sorted by saving; page 500 by age, oldest first; the table's refresh fragment
   ``/ui/orders/rows``; one order's page ``/ui/orders/<n>`` (its what-if is computed with the
   model). Wall-clock time per request from the client: median, p90, max; the answer's bytes;
   the server's resident memory (``VmRSS``/``VmHWM`` of its processes).
3. **The first page's statements.** In this process, on the same book, the statements
   :func:`live.dashboard.orders_page` issues for ``/ui``, timed one by one (medians), with the
   plan of each (``EXPLAIN QUERY PLAN``; PostgreSQL: ``EXPLAIN (ANALYZE, BUFFERS)``).

Run::

    python -m benchmarks.ui --model DIR [--open 100000] [--repeats 15] \\
        [--engines sqlite,postgresql] [--out-json F] [--out-markdown F]

Target: the first page's median and p90 under 300 ms on both engines. The exit code is 0
whether or not the target is met; the table says which.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import orjson
from sqlalchemy import Connection, event, insert

from benchmarks.harness import (
    check_listener,
    free_port,
    spawn,
    stop_process,
    tool_environment,
    wait_ready,
    write_outputs,
)
from core.ingest.postings import STATUS_PROGRESS
from core.playbook import LANGUAGES, REASON_CODES, load_playbook
from live import schema
from live.book import OrderBook, advance_clock, posting_facets, write_last_sweep
from live.dashboard import OrderQuery, orders_page
from simulator.parameters import CARRIERS as SIMULATED_CARRIERS
from simulator.parameters import PAYMENT_TYPES

logger = logging.getLogger(__name__)

API_KEY = "ui-benchmark-key"
ADMIN_KEY = "ui-benchmark-admin"
TARGET_MS = 300.0
WARMUP = 3
CHUNK = 5_000
DAY_NS = 86_400 * 1_000_000_000
HOUR_NS = DAY_NS // 24
# The newest order is placed here; the others over the 30 days before it.
NEWEST_ORDER_NS = 1_782_864_000 * 1_000_000_000  # 2026-07-01T00:00:00Z
SPAN_NS = 30 * DAY_NS
CLOCK_NS = NEWEST_ORDER_NS + DAY_NS
CLOSED_SHARE = 0.10  # of all postings
UNSCORED_SHARE = 0.005  # of the open postings: new, not scored yet
RESCORE_SHARE = 0.015  # of the open postings: a record arrived since their score
LEVEL_SHARES = {"high": 0.15, "medium": 0.30, "low": 0.55}
MODEL_NAME = "cancel-risk"
MODEL_VERSION = "benchmark"
WAREHOUSE = "义乌仓 Yiwu"
WAREHOUSE_ID = 1_020_000_456_789
OFFERS = 400
EXTRA_CARRIERS = (
    "YunExpress 云途物流",
    "4PX 递四方",
    "SF International 顺丰国际",
    "Yanwen 燕文物流",
    "JD Logistics 京东物流",
    "Boxberry",
    "СДЭК",
    "DPD Россия",
    "Почта России",
    "ПЭК",
    "Деловые Линии",
    "Major Express",
    "Kazan Express",
    "China Post 中国邮政",
    "Best Express 百世国际",
)
CARRIER_NAMES = (*(carrier.name for carrier in SIMULATED_CARRIERS), *EXTRA_CARRIERS)
CITIES_BY_REGION = {
    "Москва": "Москва",
    "Санкт-Петербург": "Санкт-Петербург",
    "Московская область": "Балашиха",
    "Ленинградская область": "Гатчина",
    "Республика Татарстан": "Казань",
    "Свердловская область": "Екатеринбург",
    "Новосибирская область": "Новосибирск",
    "Краснодарский край": "Краснодар",
    "Приморский край": "Владивосток",
    "Красноярский край": "Красноярск",
    "Ростовская область": "Ростов-на-Дону",
    "Самарская область": "Самара",
    "Нижегородская область": "Нижний Новгород",
    "Челябинская область": "Челябинск",
    "Республика Башкортостан": "Уфа",
    "Пермский край": "Пермь",
    "Воронежская область": "Воронеж",
    "Волгоградская область": "Волгоград",
    "Омская область": "Омск",
    "Саратовская область": "Саратов",
    "Тюменская область": "Тюмень",
    "Иркутская область": "Иркутск",
    "Хабаровский край": "Хабаровск",
    "Алтайский край": "Барнаул",
    "Кемеровская область": "Кемерово",
    "Оренбургская область": "Оренбург",
    "Ставропольский край": "Ставрополь",
    "Республика Дагестан": "Махачкала",
    "Удмуртская Республика": "Ижевск",
    "Ульяновская область": "Ульяновск",
    "Ярославская область": "Ярославль",
    "Тульская область": "Тула",
    "Рязанская область": "Рязань",
    "Пензенская область": "Пенза",
    "Липецкая область": "Липецк",
    "Кировская область": "Киров",
    "Чувашская Республика": "Чебоксары",
    "Калининградская область": "Калининград",
    "Тверская область": "Тверь",
    "Брянская область": "Брянск",
    "Ивановская область": "Иваново",
    "Белгородская область": "Белгород",
    "Курская область": "Курск",
    "Владимирская область": "Владимир",
    "Архангельская область": "Архангельск",
    "Смоленская область": "Смоленск",
    "Калужская область": "Калуга",
    "Вологодская область": "Вологда",
    "Орловская область": "Орёл",
    "Тамбовская область": "Тамбов",
    "Костромская область": "Кострома",
    "Новгородская область": "Великий Новгород",
    "Псковская область": "Псков",
    "Мурманская область": "Мурманск",
    "Республика Карелия": "Петрозаводск",
    "Республика Коми": "Сыктывкар",
    "Астраханская область": "Астрахань",
    "Республика Крым": "Симферополь",
    "Республика Мордовия": "Саранск",
    "Республика Марий Эл": "Йошкар-Ола",
    "Курганская область": "Курган",
    "Томская область": "Томск",
    "Республика Бурятия": "Улан-Удэ",
    "Забайкальский край": "Чита",
    "Амурская область": "Благовещенск",
    "Сахалинская область": "Южно-Сахалинск",
    "Камчатский край": "Петропавловск-Камчатский",
    "Магаданская область": "Магадан",
    "Республика Саха (Якутия)": "Якутск",
    "Ханты-Мансийский автономный округ": "Сургут",
    "Ямало-Ненецкий автономный округ": "Новый Уренгой",
    "Республика Хакасия": "Абакан",
    "Республика Алтай": "Горно-Алтайск",
    "Республика Тыва": "Кызыл",
    "Кабардино-Балкарская Республика": "Нальчик",
    "Республика Северная Осетия": "Владикавказ",
    "Чеченская Республика": "Грозный",
    "Республика Адыгея": "Майкоп",
    "Карачаево-Черкесская Республика": "Черкесск",
    "Республика Калмыкия": "Элиста",
}
REGION_NAMES = tuple(CITIES_BY_REGION)
PRODUCT_NAMES = (
    "Беспроводные наушники",
    "Kitchen scale",
    "Чехол для телефона",
    "LED лента",
    "Умные часы",
    "Рюкзак городской",
    "Power bank 20000 mAh",
    "Настольная лампа",
)


# --- filling the book ------------------------------------------------------------------------


class _FactValues(dict):
    """The values the playbook's facts quote; any one not given here is a plain number."""

    def __missing__(self, key: str) -> float:
        return 2.0


@dataclass(frozen=True)
class Plan:
    """How many postings of each kind the book holds (``open`` counts the pending ones)."""

    open: int
    closed: int
    seed: int = 7

    @property
    def total(self) -> int:
        return self.open + self.closed


def plan_for(open_count: int, seed: int = 7) -> Plan:
    return Plan(open_count, round(open_count * CLOSED_SHARE / (1 - CLOSED_SHARE)), seed)


class BookFiller:
    """Posting objects, offers and scores for the book, chunk by chunk, reproducibly."""

    def __init__(self, plan: Plan, thresholds: tuple[float, float]) -> None:
        self.plan = plan
        self.medium, self.high = thresholds
        self.playbook = load_playbook()
        rng = np.random.default_rng([plan.seed, 0])
        # Posting numbers in no relation to the kind of posting, or its order time.
        self.order_numbers = 10_000_000 + rng.permutation(plan.total)
        # Carriers and regions as a shop's are spread: a few carry most of the orders.
        self.carrier_weights = _zipf_weights(len(CARRIER_NAMES), 1.1)
        self.region_weights = _zipf_weights(len(REGION_NAMES), 0.9)

    def posting_number(self, index: int) -> str:
        number = int(self.order_numbers[index])
        return f"{number:08d}-{index % 10_000:04d}-1"

    def chunks(self, size: int = CHUNK) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, self.plan.total, size):
            yield self.chunk(start, min(start + size, self.plan.total))

    def chunk(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Postings ``start`` to ``stop``: dicts with ``posting`` (the posting row), ``offers``
        and ``score`` (the score row, or None)."""
        n = stop - start
        rng = np.random.default_rng([self.plan.seed, 1, start])
        ordered = NEWEST_ORDER_NS - (rng.random(n) * SPAN_NS).astype(np.int64)
        if start == 0:
            ordered[0] = NEWEST_ORDER_NS  # the newest order of all: the clock is a day later
        carriers = rng.choice(len(CARRIER_NAMES), n, p=self.carrier_weights)
        regions = rng.choice(len(REGION_NAMES), n, p=self.region_weights)
        payments = rng.choice(len(PAYMENT_TYPES), n, p=(0.45, 0.2, 0.25, 0.1))
        levels = rng.choice(list(LEVEL_SHARES), n, p=list(LEVEL_SHARES.values()))
        kinds = rng.random(n)
        rows = []
        for i in range(n):
            index = start + i
            closed = index >= self.plan.open
            posting = self._posting(
                index, int(ordered[i]), int(carriers[i]), int(regions[i]), int(payments[i])
            )
            posting["status"] = (
                ("delivered" if rng.random() < 0.8 else "cancelled")
                if closed
                else _open_status(CLOCK_NS - int(ordered[i]), rng)
            )
            if posting["status"] == "cancelled":
                posting["cancellation"].update(
                    cancel_reason_id=352,
                    cancel_reason="Покупатель отменил заказ",
                    cancellation_type="client",
                    cancellation_initiator="Клиент",
                )
            unscored = not closed and kinds[i] < UNSCORED_SHARE
            rescore = not closed and UNSCORED_SHARE <= kinds[i] < UNSCORED_SHARE + RESCORE_SHARE
            score = None
            if not unscored:
                score = self._score(posting, str(levels[i]), rng)
            rows.append(
                {
                    "posting": self._posting_row(posting, closed, unscored, rescore, score),
                    "offers": sorted({p["offer_id"] for p in posting["products"]}),
                    "score": score,
                }
            )
        return rows

    def _posting(
        self, index: int, ordered_at: int, carrier: int, region: int, payment: int
    ) -> dict[str, Any]:
        """A posting object as the Seller API returns it (the simulator's form)."""
        number = self.posting_number(index)
        order_number = number.rsplit("-", 1)[0]
        carrier_name = CARRIER_NAMES[carrier]
        provider_id = 1001 + carrier if carrier >= len(SIMULATED_CARRIERS) else 0
        provider_id = provider_id or SIMULATED_CARRIERS[carrier].tpl_provider_id
        region_name = REGION_NAMES[region]
        city = CITIES_BY_REGION[region_name]
        offer = index * 7 % OFFERS
        paid = round(20 + (index * 37 % 4000) / 10, 2)
        promo = index % 5 == 0
        regular = round(paid * 1.25, 2) if promo else paid
        customer = 70_000_000 + index * 13 % 90_000
        return {
            "posting_number": number,
            "order_id": 600_000_000 + index,
            "order_number": order_number,
            "status": "awaiting_packaging",
            "substatus": "",
            "delivery_method": {
                "id": 21_000_000_000 + provider_id,
                "name": f"{carrier_name}, {WAREHOUSE}",
                "warehouse_id": WAREHOUSE_ID,
                "warehouse": WAREHOUSE,
                "tpl_provider_id": provider_id,
                "tpl_provider": carrier_name,
            },
            "tracking_number": f"OZ{600_000_000 + index}CN",
            "tpl_integration_type": "non_integrated",
            "in_process_at": _iso(ordered_at),
            "shipment_date": _iso(ordered_at + 4 * DAY_NS),
            "delivering_date": None,
            "cancellation": {
                "cancel_reason_id": 0,
                "cancel_reason": "",
                "cancellation_type": "",
                "cancelled_after_ship": False,
                "affect_cancellation_rating": False,
                "cancellation_initiator": "",
            },
            "customer": {
                "customer_id": customer,
                "name": f"Покупатель {customer % 9973}",
                "phone": f"+7900{customer % 10_000_000:07d}",
                "address": {"city": city, "region": region_name},
            },
            "products": [
                {
                    "price": f"{paid:.6f}",
                    "currency_code": "CNY",
                    "offer_id": f"SKU-007-{offer:04d}",
                    "name": f"{PRODUCT_NAMES[offer % len(PRODUCT_NAMES)]} #{offer}",
                    "sku": 1_500_000_000 + offer * 37,
                    "quantity": 1 + (index % 11 == 0),
                    "is_marketplace_buyout": False,
                }
            ],
            "analytics_data": {
                "region": region_name,
                "city": city,
                "delivery_type": "Courier" if index % 4 == 0 else "PVZ",
                "is_premium": index % 9 == 0,
                "payment_type_group_name": PAYMENT_TYPES[payment],
                "warehouse_id": WAREHOUSE_ID,
                "warehouse": WAREHOUSE,
                "tpl_provider_id": provider_id,
                "tpl_provider": carrier_name,
                "delivery_date_begin": _iso(ordered_at + 14 * DAY_NS),
                "delivery_date_end": _iso(ordered_at + 18 * DAY_NS),
                "is_legal": index % 50 == 0,
            },
            "financial_data": {
                "cluster_from": "Китай",
                "cluster_to": region_name,
                "products": [
                    {
                        "product_id": 1_500_000_000 + offer * 37,
                        "price": paid,
                        "old_price": regular,
                        "total_discount_percent": 20.0 if promo else 0,
                        "actions": ["Распродажа недели"] if promo else [],
                        "currency_code": "CNY",
                    }
                ],
            },
            "is_express": False,
        }

    def _score(self, posting: dict[str, Any], level: str, rng: np.random.Generator) -> dict:
        """A score row: the probability in ``level``'s band and the playbook's explanations."""
        low, high = {
            "low": (0.005, self.medium),
            "medium": (self.medium, self.high),
            "high": (self.high, 0.95),
        }[level]
        probability = round(float(low + (high - low) * rng.random()), 6)
        decision = {
            "high": "hold_and_confirm" if rng.random() < 0.6 else "contact_buyer",
            "medium": "contact_buyer" if rng.random() < 0.7 else "ship",
            "low": "ship",
        }[level]
        count = 1 if level == "low" else int(rng.integers(2, 4))
        codes = [str(c) for c in rng.choice(REASON_CODES, count, replace=False)]
        shares = rng.dirichlet(np.ones(count)) * (0.6 + 0.35 * rng.random())
        shares = sorted((round(float(s), 4) for s in shares), reverse=True)
        analytics = posting["analytics_data"]
        values = _FactValues(
            price_pct=-float(rng.integers(3, 30)),
            days_late=float(rng.integers(1, 9)),
            days_to_promise=round(float(rng.random() * 3), 1),
            date_changes=float(rng.integers(1, 4)),
            quiet_days=float(rng.integers(2, 10)),
            silent_days=float(rng.integers(2, 10)),
            days_since_order=round(0.5 + float(rng.random() * 5.5), 1),
            edits=float(rng.integers(1, 4)),
            hours_since_order=float(rng.integers(1, 20)),
            earlier_cancels=float(rng.integers(1, 5)),
            payment=analytics["payment_type_group_name"],
            region=analytics["region"],
            carrier=analytics["tpl_provider"],
            carrier_cancel_pct=float(rng.integers(5, 60)),
        )
        saving = round(float(probability * (20 + 300 * rng.random())), 4)
        explanations = {}
        for lang in LANGUAGES:
            reasons, actions = [], []
            if decision != "ship":
                actions.append(self.playbook.decisions[decision].get(lang))
            for code, share in zip(codes, shares, strict=True):
                entry = self.playbook.entry(code)
                facts = list(entry.facts.values())
                held = facts[: 1 + (len(facts) > 1 and share > 0.3)]
                reasons.append(
                    {
                        "code": code,
                        "share": share,
                        "risk_drop": round(share * probability, 6),
                        "facts": "; ".join(t.get(lang).format_map(values) for t in held),
                    }
                )
                actions += [a.get(lang) for a in entry.actions if a.get(lang) not in actions]
            explanations[lang] = {
                "reasons": reasons,
                "actions": actions[:4],
                "decision": decision,
                "expected_saving": saving,
            }
        return {
            "posting_number": posting["posting_number"],
            "as_of": CLOCK_NS,
            "scored_at": CLOCK_NS,
            "trigger": "sweep",
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "probability": probability,
            "risk_level": level,
            "explanations": orjson.dumps(explanations).decode(),
            "_en": explanations["en"],
        }

    def _posting_row(
        self,
        posting: dict[str, Any],
        closed: bool,
        unscored: bool,
        rescore: bool,
        score: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The row accept_posting stores, then what record_scores set (score, or closing)."""
        ordered_at = posting_facets(posting)["ordered_at"]
        row: dict[str, Any] = {
            "posting_number": posting["posting_number"],
            "body": orjson.dumps(posting).decode(),
            "progress": STATUS_PROGRESS.get(posting["status"], 0),
            "received_at": ordered_at + 5 * 60 * 1_000_000_000,
            "is_open": not closed,
            "note": None,
            "event_seq": 2 if rescore else 1,
            "scored_seq": 0 if unscored else 1,
            "pending": unscored or rescore,
            "score_id": None,
            "scored_as_of": None,
            "probability": None,
            "risk_level": None,
            "decision": None,
            "first_reason": None,
            "expected_saving": None,
            **posting_facets(posting),
        }
        if closed:
            row["note"] = f"the posting is {posting['status']}: only open postings are scored"
        if score is not None:
            explained = score["_en"]
            reasons = explained["reasons"]
            row.update(
                scored_as_of=score["as_of"],
                probability=score["probability"],
                risk_level=score["risk_level"],
                decision=explained["decision"],
                first_reason=reasons[0]["code"] if reasons else None,
                expected_saving=explained["expected_saving"],
            )
        return row


def _zipf_weights(count: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return weights / weights.sum()


def _open_status(age_ns: int, rng: np.random.Generator) -> str:
    if age_ns < 20 * HOUR_NS:
        return "awaiting_packaging"
    return "delivering" if rng.random() < 0.6 else "awaiting_deliver"


def _iso(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"


def _insert_chunk(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """One chunk: the scores (their ids back, in order), then the postings and their offers."""
    scored = [row for row in rows if row["score"] is not None]
    if scored:
        values = [{k: v for k, v in row["score"].items() if k != "_en"} for row in scored]
        ids = connection.execute(
            insert(schema.scores).returning(schema.scores.c.id, sort_by_parameter_order=True),
            values,
        ).scalars()
        for row, score_id in zip(scored, ids, strict=True):
            row["posting"]["score_id"] = score_id
    connection.execute(insert(schema.postings), [row["posting"] for row in rows])
    offers = [
        {"offer_id": offer, "posting_number": row["posting"]["posting_number"]}
        for row in rows
        for offer in row["offers"]
    ]
    connection.execute(insert(schema.posting_offers), offers)


def fill_book(url: str, filler: BookFiller) -> dict[str, Any]:
    """Migrate a fresh book at ``url`` and fill it; the times taken and what it holds."""
    started = time.perf_counter()
    book = OrderBook(url)
    migrated = time.perf_counter()
    counts = {"open": 0, "closed": 0, "pending": 0, "unscored": 0, "scores": 0}
    explanation_bytes: list[int] = []
    generating = inserting = 0.0
    try:
        for start in range(0, filler.plan.total, CHUNK):
            begun = time.perf_counter()
            rows = filler.chunk(start, min(start + CHUNK, filler.plan.total))
            generated = time.perf_counter()
            with book.writes.begin() as connection:
                _insert_chunk(connection, rows)
            inserting += time.perf_counter() - generated
            generating += generated - begun
            for row in rows:
                posting = row["posting"]
                counts["open" if posting["is_open"] else "closed"] += 1
                counts["pending"] += bool(posting["pending"])
                counts["unscored"] += posting["is_open"] and row["score"] is None
                counts["scores"] += row["score"] is not None
                if row["score"] is not None:
                    explanation_bytes.append(len(row["score"]["explanations"].encode()))
        with book.writes.begin() as connection:
            advance_clock(connection, CLOCK_NS)
            write_last_sweep(connection, CLOCK_NS)
        filled = time.perf_counter()
        analysed = 0.0
        if book.dialect == "postgresql":
            with book.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT"
            ) as connection:
                connection.exec_driver_sql("VACUUM ANALYZE")
            analysed = time.perf_counter() - filled
        size = _database_bytes(book)
    finally:
        book.close()
    return {
        **counts,
        "postings": filler.plan.total,
        "migrate_s": migrated - started,
        "generate_s": generating,
        "insert_s": inserting,
        "analyze_s": analysed,
        "total_s": time.perf_counter() - started,
        "database_mb": size / 1e6,
        "explanation_bytes_median": statistics.median(explanation_bytes or [0]),
    }


def _database_bytes(book: OrderBook) -> int:
    with book.engine.connect() as connection:
        if book.dialect == "postgresql":
            return int(
                connection.exec_driver_sql(
                    "SELECT pg_database_size(current_database())"
                ).scalar_one()
            )
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar_one()
        page_size = connection.exec_driver_sql("PRAGMA page_size").scalar_one()
        return int(pages) * int(page_size)


# --- the book's engines ------------------------------------------------------------------------


def _engine_name(name: str) -> str:
    name = name.strip().lower()
    if name in ("postgres", "postgresql", "pg"):
        return "postgresql"
    if name == "sqlite":
        return "sqlite"
    raise SystemExit(f"unknown engine {name!r}: sqlite or postgresql")


@contextlib.contextmanager
def book_url(engine: str, work: Path) -> Iterator[str]:
    """A fresh book's URL: a SQLite file in ``work``, or a database on a server of its own."""
    if engine == "sqlite":
        yield f"sqlite:///{work / 'book.db'}"
        return
    from benchmarks.postgres import create_database, start_postgres

    server = start_postgres()
    try:
        yield create_database(server.url, "bench_ui")
    finally:
        server.stop()


# --- the server and the pages ------------------------------------------------------------------


@contextlib.contextmanager
def dashboard_server(model: Path, url: str, work: Path, name: str) -> Iterator[Any]:
    """``cancel-risk serve --live`` on a free loopback port; its process and base URL."""
    port = free_port()
    env = {
        **tool_environment(),
        "CANCEL_RISK_API_KEYS": API_KEY,
        "CANCEL_RISK_ADMIN_KEY": ADMIN_KEY,
        "CANCEL_RISK_MODEL_CACHE_DIR": str(work / "model-cache"),
        "CANCEL_RISK_CLOCK": "events",
        "CANCEL_RISK_WORKER": "false",
    }
    command = [str(Path(sys.executable).with_name("cancel-risk")), "serve", "--live"]
    command += ["--port", str(port), "--model", str(model), "--db", url]
    log = work / f"{name}.log"
    process = spawn(command, log, env, cwd=work)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/readyz", process, log)
        check_listener(port, process)
        yield process, base, log
    finally:
        stop_process(process)


def _memory(pid: int) -> dict[str, float]:
    """Resident memory of ``pid`` and its children (MB): now (VmRSS) and at most (VmHWM)."""
    from benchmarks.harness import process_tree

    figures = {"rss_mb": 0.0, "peak_rss_mb": 0.0}
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    key = "rss_mb" if name == "VmRSS" else "peak_rss_mb"
                    figures[key] += int(value.split()[0]) / 1024
    return figures


def _summary(times_ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(times_ms),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "max_ms": max(times_ms),
        "min_ms": min(times_ms),
    }


def measure_pages(
    base: str, pages: list[tuple[str, str]], repeats: int, pid: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Log in, warm up, then ``repeats`` rounds of every page; figures per page."""
    with httpx.Client(base_url=base, timeout=120, follow_redirects=False) as client:
        login = client.post("/ui/login", data={"api_key": API_KEY, "next": "/ui"})
        if login.status_code != 303 or not client.cookies:
            raise RuntimeError(f"login failed: {login.status_code} {login.text[:300]}")
        last: dict[str, httpx.Response] = {}

        def get(path: str) -> float:
            start = time.perf_counter()
            response = client.get(path)
            body = response.content
            elapsed = (time.perf_counter() - start) * 1e3
            if response.status_code != 200 or not body:
                raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
            last[path] = response
            return elapsed

        for _, path in pages:
            for _ in range(WARMUP):
                get(path)
        times: dict[str, list[float]] = {path: [] for _, path in pages}
        # Round by round, so that the machine's noise falls on every page alike.
        for _ in range(repeats):
            for _, path in pages:
                times[path].append(get(path))
    results = []
    for name, path in pages:
        body = last[path].text
        figures = {"page": name, "path": path, "bytes": len(last[path].content)}
        figures.update(_summary(times[path]))
        if path.startswith("/ui/orders/") and not path.startswith("/ui/orders/rows"):
            figures["what_if"] = 'class="what-if"' in body
        results.append(figures)
    return results, _memory(pid)


# --- the first page's statements, in this process ---------------------------------------------


def statement_breakdown(url: str, repeats: int = 5) -> dict[str, Any]:
    """The statements orders_page issues for ``/ui``: each run alone (executed and all its
    rows fetched, median of ``repeats``) and its plan; and the whole call's time."""
    book = OrderBook(url)
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.startswith("BEGIN"):
            captured.append((statement, parameters))

    try:
        with book.engine.connect() as connection:
            now = int(
                connection.exec_driver_sql(
                    "SELECT value FROM book_meta WHERE key = 'clock_ns'"
                ).scalar_one()
            )
        totals = []
        for _ in range(repeats + 1):  # the first one warms the caches
            start = time.perf_counter()
            with book.engine.connect() as connection:
                page = orders_page(connection, OrderQuery(), now, "en")
            totals.append((time.perf_counter() - start) * 1e3)
        event.listen(book.engine, "before_cursor_execute", capture)
        with book.engine.connect() as connection:
            orders_page(connection, OrderQuery(), now, "en")
        event.remove(book.engine, "before_cursor_execute", capture)
        statements = []
        for sql, parameters in captured:
            times = []
            with book.engine.connect() as connection:
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    rows = connection.exec_driver_sql(sql, parameters).all()
                    times.append((time.perf_counter() - start) * 1e3)
            statements.append(
                {
                    "sql": " ".join(sql.split()),
                    "median_ms": statistics.median(times[1:]),
                    "rows": len(rows),
                    "plan": _plan(book, sql, parameters),
                }
            )
    finally:
        book.close()
    return {
        "orders_page_median_ms": statistics.median(totals[1:]),
        "rows": len(page.rows),
        "total": page.total,
        "statements": statements,
    }


def _plan(book: OrderBook, sql: str, parameters: Any) -> list[str]:
    prefix = (
        "EXPLAIN (ANALYZE, BUFFERS) " if book.dialect == "postgresql" else "EXPLAIN QUERY PLAN "
    )
    with book.engine.connect() as connection:
        rows = connection.exec_driver_sql(prefix + sql, parameters).all()
    if book.dialect == "postgresql":
        return [row[0] for row in rows]
    return [f"{row[0]}|{row[1]}|{row[3]}" for row in rows]


# --- one engine, the whole run, the report -----------------------------------------------------


def run_engine(args: argparse.Namespace, engine: str, filler: BookFiller, work: Path) -> dict:
    logger.info("%s: filling the book with %s postings", engine, f"{filler.plan.total:,}")
    with book_url(engine, work) as url:
        fill = fill_book(url, filler)
        logger.info("%s: filled in %.1f s", engine, fill["total_s"])
        carrier = CARRIER_NAMES[2]
        order = _first_open_scored(filler)
        pages = [
            ("first page", "/ui"),
            ("risk=high", "/ui?risk=high"),
            ("one carrier, sort=saving", f"/ui?carrier={quote(carrier)}&sort=saving"),
            ("sort=age asc, page 500", "/ui?sort=age&dir=asc&page=500"),
            ("refresh fragment", "/ui/orders/rows"),
            ("one order (what-if)", f"/ui/orders/{quote(order)}"),
        ]
        with dashboard_server(args.model, url, work, f"serve-{engine}") as (process, base, _):
            results, memory = measure_pages(base, pages, args.repeats, process.pid)
        breakdown = statement_breakdown(url)
    first = results[0]
    return {
        "engine": engine,
        "fill": fill,
        "pages": results,
        "server": memory,
        "first_page_statements": breakdown,
        "target_met": first["median_ms"] < TARGET_MS and first["p90_ms"] < TARGET_MS,
    }


def _first_open_scored(filler: BookFiller) -> str:
    """A scored open posting (with its what-if to compute): the first of the first chunk."""
    for row in filler.chunk(0, min(CHUNK, filler.plan.total)):
        posting = row["posting"]
        if posting["is_open"] and not posting["pending"] and posting["risk_level"] == "high":
            return posting["posting_number"]
    raise RuntimeError("no scored open posting in the book")


def _thresholds(model: Path) -> tuple[float, float]:
    """The model's medium and high thresholds (the levels' probability bands follow them)."""
    held = orjson.loads((model / "model.json").read_bytes()).get("thresholds") or {}
    return float(held.get("medium", 0.1)), float(held.get("high", 0.3))


def run(args: argparse.Namespace) -> dict[str, Any]:
    engines = [_engine_name(name) for name in args.engines.split(",") if name.strip()]
    filler = BookFiller(plan_for(args.open), _thresholds(args.model))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as scratch:
        for engine in engines:
            work = Path(scratch) / engine
            work.mkdir()
            try:
                results.append(run_engine(args, engine, filler, work))
            except Exception as exc:
                from benchmarks.postgres import PostgresUnavailable

                if not isinstance(exc, PostgresUnavailable):
                    raise
                logger.warning("%s skipped: %s", engine, exc)
                results.append({"engine": engine, "skipped": str(exc)})
    return {
        "open": filler.plan.open,
        "closed": filler.plan.closed,
        "repeats": args.repeats,
        "warmup": WARMUP,
        "target_ms": TARGET_MS,
        "cpus": os.cpu_count(),
        "engines": results,
    }


def format_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Seller dashboard, {report['open']:,} open + {report['closed']:,} closed postings, "
        f"{report['repeats']} requests per page after {report['warmup']} warm-up "
        f"({report['cpus']} CPUs); wall clock per request from the client:",
        "",
        "| book | page | median ms | p90 ms | max ms | bytes |",
        "|---|---|---|---|---|---|",
    ]
    measured = [row for row in report["engines"] if "skipped" not in row]
    for row in measured:
        for page in row["pages"]:
            note = ""
            if page.get("what_if") is False:
                note = " (no what-if)"
            lines.append(
                f"| {row['engine']} | {page['page']}{note} | {page['median_ms']:.1f} | "
                f"{page['p90_ms']:.1f} | {page['max_ms']:.1f} | {page['bytes']:,} |"
            )
    lines += [
        "",
        "| book | fill s (generate / insert / analyze) | postings/s | explanation bytes "
        "(median) | database MB | server RSS MB (peak) | first page < 300 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in measured:
        fill, server = row["fill"], row["server"]
        lines.append(
            f"| {row['engine']} | {fill['total_s']:.1f} ({fill['generate_s']:.1f} / "
            f"{fill['insert_s']:.1f} / {fill['analyze_s']:.1f}) | "
            f"{fill['postings'] / fill['total_s']:,.0f} | "
            f"{fill['explanation_bytes_median']:,.0f} | {fill['database_mb']:,.0f} | "
            f"{server['rss_mb']:.0f} ({server['peak_rss_mb']:.0f}) | "
            f"{'target met' if row['target_met'] else 'missed'} |"
        )
    for row in report["engines"]:
        if "skipped" in row:
            lines.append(f"\n{row['engine']}: skipped ({row['skipped']})")
    for row in measured:
        breakdown = row["first_page_statements"]
        lines += [
            "",
            f"{row['engine']}: the statements of `orders_page` for `/ui`, in process "
            f"(the whole call: {breakdown['orders_page_median_ms']:.1f} ms median; each "
            "statement alone, its rows fetched):",
            "",
            "| ms | rows | statement | plan |",
            "|---|---|---|---|",
        ]
        for statement in breakdown["statements"]:
            sql = statement["sql"]
            sql = sql if len(sql) <= 160 else sql[:157] + "..."
            plan = "<br>".join(line.replace("|", "/") for line in statement["plan"][:12])
            lines.append(
                f"| {statement['median_ms']:.1f} | {statement['rows']:,} | `{sql}` | {plan} |"
            )
    for row in measured:
        verdict = "target met" if row["target_met"] else "missed"
        first = row["pages"][0]
        lines.append(
            f"\n{row['engine']}: first page median {first['median_ms']:.1f} ms, "
            f"p90 {first['p90_ms']:.1f} ms: {verdict} (< {report['target_ms']:.0f} ms)"
        )
    return "\n".join(lines) + "\n"


def _interrupted(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="A saved RiskModel directory.")
    parser.add_argument("--open", type=int, default=100_000, help="Open postings in the book.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed requests per page.")
    parser.add_argument("--engines", default="sqlite,postgresql", help="sqlite, postgresql.")
    parser.add_argument("--out-json", type=Path, help="Also write the figures to this file.")
    parser.add_argument("--out-markdown", type=Path, help="Also write the tables to this file.")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.open < 1:
        raise SystemExit("--open must be at least 1")
    if not (args.model / "booster.txt").is_file():
        raise SystemExit(f"{args.model} is not a saved model (no booster.txt)")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A SIGTERM unwinds like Ctrl-C: the server, PostgreSQL and the temporary files go.
    signal.signal(signal.SIGTERM, _interrupted)
    report = run(args)
    write_outputs(args, report, format_markdown(report))


if __name__ == "__main__":
    main()
