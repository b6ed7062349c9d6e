"""The live order book: every record a seller's shop sends, kept once, and every score given.

:class:`OrderBook` opens a database by URL (SQLite, in WAL mode, by default; PostgreSQL through
``postgresql://``), upgrades its schema with the Alembic migrations, and offers the operations
of the live mode, each on a connection inside the caller's transaction:

- receiving: :func:`accept_push`, :func:`accept_posting`, :func:`accept_price`,
  :func:`accept_scan`. A record is stored once (its digest is unique), so retries, replays and
  reordered streams give the same book; a stored record marks the open postings it concerns for
  re-scoring (``pending``), a posting's own records and its offers' prices and card edits.
- scoring: :func:`pending_postings`, :func:`open_postings`, :func:`score_inputs` (what a
  request about a posting holds: the posting object, its pushes, its offers' card edits and
  prices, its scans) and :func:`record_scores`, which also raises the alerts a score calls for
  into the outbox, in the same transaction.
- reading: :func:`posting_view`, :func:`list_postings`, :func:`book_status`.
- the outbox: :func:`due_alerts`, :func:`mark_alert_sent`, :func:`mark_alert_failed`,
  :func:`record_channel`, :func:`channel_health`.

The book's clock (:func:`advance_clock`, :func:`read_clock`) is the latest record time it has
accepted; a service replaying an archive scores at that moment instead of the wall clock.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    cast,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from core.ingest.events import NEXT_PUSH_AT, PUSH_SPECS, RECEIVED_AT
from core.ingest.postings import STATUS_PROGRESS
from core.ingest.values import NotCanonical, build_utc_timestamps, parse_timestamp
from live import schema

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Alembic's ``context`` is one global per process: two threads must not migrate at once.
_MIGRATING = threading.Lock()
CLOCK_KEY = "clock_ns"
LAST_SWEEP_KEY = "last_sweep_ns"
SWEEP_REQUEST_KEY = "sweep_requested_ns"
SWEEP_DONE_KEY = "sweep_done_ns"

# Pushes the book keeps: the ones the features read, and the shipment deadline's changes (kept
# for the archive; the features read the deadline from the posting object).
CUTOFF_PUSH = "TYPE_CUTOFF_DATE_CHANGED"
KEPT_PUSH_TYPES = frozenset({*PUSH_SPECS, CUTOFF_PUSH})
PUSH_TIME_KEYS: dict[str, tuple[str, ...]] = {
    name: tuple(key for key in spec.time_keys if key not in (RECEIVED_AT, NEXT_PUSH_AT))
    for name, spec in PUSH_SPECS.items()
}
PUSH_TIME_KEYS[CUTOFF_PUSH] = ()


# --- the database ---------------------------------------------------------------------------------


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean PostgreSQL through psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer. synchronous=FULL: a commit is on disk before the push
    # it holds is acknowledged, even if the machine loses power (NORMAL would survive a crash of
    # the process only).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    cursor.close()
    # SQLAlchemy's "begin" event opens every transaction itself (_sqlite_begin), not pysqlite.
    dbapi_connection.isolation_level = None


WRITES = "book_writes"  # execution option: this connection's transactions will write
BUSY_TIMEOUT_S = 30.0  # how long a SQLite statement waits for a lock before it fails
LOCK_POLL_S = 0.0002


def _sqlite_begin(connection: Connection) -> None:
    """A transaction that will write takes the write lock at once (``BEGIN IMMEDIATE``): one
    that read first and then wrote could meet another process's commit in between and fail at
    once with SQLITE_BUSY, where waiting for the lock (the busy timeout) is what is wanted.
    A reading transaction is an ordinary ``BEGIN``: all its reads see one state of the book."""
    if not connection.get_execution_options().get(WRITES, False):
        connection.exec_driver_sql("BEGIN")
        return
    # SQLite's own wait for a lock sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries: a
    # push would wait 8 ms for a lock held 4 ms. This waits in steps of a fifth of a
    # millisecond instead, up to the busy timeout.
    cursor = connection.connection.driver_connection.cursor()
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    cursor.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(LOCK_POLL_S)
    finally:
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.close()


def create_book_engine(url: str) -> Engine:
    """An engine for the book at ``url``; a SQLite file's directory is created if missing."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
            pool_pre_ping=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # An unreachable server fails fast; a connect_timeout in the URL takes precedence.
    timeout = {} if "connect_timeout" in parsed.query else {"connect_timeout": 5}
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4, connect_args=timeout)


def migrate(engine: Engine) -> None:
    """Upgrade the book's schema to the newest migration (creates it in an empty database)."""
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines at every start
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _MIGRATING, engine.execution_options(**{WRITES: True}).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class OrderBook:
    """The book's engine, with its schema upgraded. ``url`` as in :func:`create_book_engine`."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = create_book_engine(self.url)
        # The same pool, for transactions that write (see _sqlite_begin).
        self.writes = self.engine.execution_options(**{WRITES: True})
        migrate(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()


def redacted(url: str) -> str:
    """The URL with its password hidden, for logs."""
    return make_url(normalise_url(url)).render_as_string(hide_password=True)


def _insert(connection: Connection, table: Any) -> Any:
    dialect = pg_dialect if connection.dialect.name == "postgresql" else sqlite_dialect
    return dialect.insert(table)


def _inserted(connection: Connection, statement: Any, column: Any) -> bool:
    """Whether an ``INSERT ... ON CONFLICT DO NOTHING`` stored its row. Not ``rowcount``: on
    PostgreSQL SQLAlchemy adds ``RETURNING id`` itself, and the count then reads -1."""
    return connection.execute(statement.returning(column)).first() is not None


def digest_of(record: Any) -> str:
    """The SHA-256 of a record's canonical JSON (sorted keys): equal records, equal digests."""
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def read_moment(value: Any) -> int | None:
    """A time as the ingestion reads it (more forms than ISO-8601 UTC), in UTC ns; None when it
    is absent or not a time."""
    if value is None or value == "":
        return None
    try:
        return parse_timestamp(value)
    except NotCanonical:
        pass
    if not isinstance(value, str):
        return None
    at = build_utc_timestamps([value])[0].iloc[0]
    return None if pd.isna(at) else int(at.value)


def _time_or_none(value: Any) -> int | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_timestamp(value)
    except NotCanonical:
        return None


# --- receiving ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """What storing one record did: ``stored`` (new) or a duplicate, and its time if known."""

    stored: bool
    at: int | None = None


def push_time(push: Mapping[str, Any]) -> int | None:
    """The push's own time (its type's time keys, as the ingestion reads them), if any."""
    for key in PUSH_TIME_KEYS.get(str(push.get("message_type")), ()):
        at = _time_or_none(push.get(key))
        if at is not None:
            return at
    return None


def _touch_posting(connection: Connection, posting_number: str) -> None:
    connection.execute(
        update(schema.postings)
        .where(schema.postings.c.posting_number == posting_number, schema.postings.c.is_open)
        .values(event_seq=schema.postings.c.event_seq + 1, pending=True)
    )


def _touch_offer(connection: Connection, offer_id: str) -> None:
    holders = select(schema.posting_offers.c.posting_number).where(
        schema.posting_offers.c.offer_id == offer_id
    )
    connection.execute(
        update(schema.postings)
        .where(schema.postings.c.posting_number.in_(holders), schema.postings.c.is_open)
        .values(event_seq=schema.postings.c.event_seq + 1, pending=True)
    )


def accept_push(connection: Connection, push: dict[str, Any], received_at: int) -> Accepted:
    """Store a push of a kept type once; a new one marks its posting (or offer's) for scoring.

    The push is stored as received; one without a time of its own (a delivery-date change)
    gets ``received_at``, when the book received it (unless it says so already), so that the
    archive dates it as the book did. A push with its own time is kept exactly as sent, so the
    book does not depend on the order, or the moment, in which pushes arrive.
    """
    digest = digest_of(push)
    at = push_time(push)
    body = push
    if at is None and RECEIVED_AT not in push:
        body = {**push, RECEIVED_AT: iso_time(received_at)}
    posting_number = push.get("posting_number") or None
    offer_id = push.get("offer_id") if not posting_number else None
    stored = _inserted(
        connection,
        _insert(connection, schema.pushes)
        .values(
            digest=digest,
            message_type=str(push["message_type"]),
            posting_number=None if posting_number is None else str(posting_number),
            offer_id=None if not offer_id else str(offer_id),
            event_at=at,
            received_at=received_at,
            body=_dumps(body),
        )
        .on_conflict_do_nothing(index_elements=["digest"]),
        schema.pushes.c.id,
    )
    if stored:
        if posting_number:
            _touch_posting(connection, str(posting_number))
        elif offer_id:
            _touch_offer(connection, str(offer_id))
    return Accepted(stored, at if at is not None else received_at)


FACET_LENGTH = 256  # the dashboard's text columns


def _text(value: Any) -> str | None:
    """A text facet as the columns hold it: trimmed, without NUL (PostgreSQL refuses it), cut
    to the column's length; None for anything else."""
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "").strip()[:FACET_LENGTH].strip() or None


def posting_facets(posting: Mapping[str, Any]) -> dict[str, Any]:
    """What the dashboard filters by, read from a posting object as the ingestion reads it:
    the order time (in any form the ingestion reads), the carrier (``delivery_method``, else
    ``analytics_data``), the region and the payment type group. Odd values are None."""
    method = posting.get("delivery_method")
    analytics = posting.get("analytics_data")
    method = method if isinstance(method, Mapping) else {}
    analytics = analytics if isinstance(analytics, Mapping) else {}
    given = posting.get("in_process_at")
    return {
        "ordered_at": read_moment(given if given else posting.get("created_at")),
        "carrier": _text(method.get("tpl_provider")) or _text(analytics.get("tpl_provider")),
        "region": _text(analytics.get("region")),
        "payment": _text(analytics.get("payment_type_group_name")),
    }


def accept_posting(connection: Connection, posting: dict[str, Any], received_at: int) -> str:
    """Keep the posting object the ingestion's merge would let win; ``new``, ``updated`` or
    ``kept`` (an older or less progressed object than the one held)."""
    number = str(posting["posting_number"])
    progress = STATUS_PROGRESS.get(str(posting.get("status")), 0)
    table = schema.postings
    held = connection.execute(
        select(table.c.progress, table.c.body).where(table.c.posting_number == number)
    ).first()
    body = _dumps(posting)
    if held is not None and (progress < held.progress or body == held.body):
        return "kept"
    offers = sorted(
        {str(p.get("offer_id")) for p in posting.get("products") or () if isinstance(p, dict)}
        - {"None", ""}
    )
    if held is None and _inserted(
        connection,
        _insert(connection, table)
        .values(
            posting_number=number,
            body=body,
            progress=progress,
            received_at=received_at,
            is_open=True,
            event_seq=1,
            scored_seq=0,
            pending=True,
            **posting_facets(posting),
        )
        .on_conflict_do_nothing(index_elements=["posting_number"]),
        table.c.posting_number,
    ):
        outcome = "new"
    else:
        # The progress is compared again in the UPDATE: another writer (another process on the
        # same database) may have stored a more progressed object since ``held`` was read.
        updated = connection.execute(
            update(table)
            .where(table.c.posting_number == number, table.c.progress <= progress)
            .values(
                body=body,
                progress=progress,
                received_at=received_at,
                event_seq=table.c.event_seq + 1,
                pending=table.c.is_open,
                **posting_facets(posting),
            )
        )
        if updated.rowcount == 0:
            return "kept"
        outcome = "updated"
    if offers:
        connection.execute(
            _insert(connection, schema.posting_offers)
            .values([{"offer_id": offer, "posting_number": number} for offer in offers])
            .on_conflict_do_nothing(index_elements=["offer_id", "posting_number"])
        )
    return outcome


def _accept_row(
    connection: Connection, table: Any, key: str, row: dict[str, Any], received_at: int
) -> tuple[bool, int | None]:
    """Store a price or scan row once (keyed by ``key``): whether it is new, and its time."""
    at = _time_or_none(row.get("at"))
    stored = _inserted(
        connection,
        _insert(connection, table)
        .values(
            digest=digest_of(row),
            at=at,
            received_at=received_at,
            body=_dumps(row),
            **{key: str(row[key])},
        )
        .on_conflict_do_nothing(index_elements=["digest"]),
        table.c.id,
    )
    return stored, at


def accept_price(connection: Connection, row: dict[str, Any], received_at: int) -> Accepted:
    """Store a price-log row once; a new one marks the open postings of its offer."""
    stored, at = _accept_row(connection, schema.prices, "offer_id", row, received_at)
    if stored:
        _touch_offer(connection, str(row["offer_id"]))
    return Accepted(stored, at)


def accept_scan(connection: Connection, row: dict[str, Any], received_at: int) -> Accepted:
    """Store a carrier scan once; a new one marks its posting."""
    stored, at = _accept_row(connection, schema.scans, "posting_number", row, received_at)
    if stored:
        _touch_posting(connection, str(row["posting_number"]))
    return Accepted(stored, at)


# --- the clock ------------------------------------------------------------------------------------


def read_meta(connection: Connection, key: str) -> str | None:
    return connection.execute(
        select(schema.meta.c.value).where(schema.meta.c.key == key)
    ).scalar_one_or_none()


def write_meta(connection: Connection, key: str, value: str) -> None:
    statement = _insert(connection, schema.meta).values(key=key, value=value)
    connection.execute(
        statement.on_conflict_do_update(index_elements=["key"], set_={"value": value})
    )


def read_clock(connection: Connection) -> int | None:
    """The latest record time the book has accepted (UTC ns), None while it is empty."""
    value = read_meta(connection, CLOCK_KEY)
    return None if value is None else int(value)


def advance_clock(connection: Connection, at: int) -> None:
    """Move the book's clock to ``at`` if that is later (it never goes back).

    One upsert whose update is conditional: a read-then-write lets a concurrent writer's
    earlier time overwrite a later one committed meanwhile.
    """
    statement = _insert(connection, schema.meta).values(key=CLOCK_KEY, value=str(at))
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["key"],
            set_={"value": str(at)},
            where=cast(schema.meta.c.value, BigInteger) < at,
        )
    )


def read_last_sweep(connection: Connection) -> int | None:
    value = read_meta(connection, LAST_SWEEP_KEY)
    return None if value is None else int(value)


def write_last_sweep(connection: Connection, at: int) -> None:
    write_meta(connection, LAST_SWEEP_KEY, str(at))


def request_sweep(connection: Connection, at: int) -> None:
    """Ask the worker to re-score every open posting at its next turn."""
    write_meta(connection, SWEEP_REQUEST_KEY, str(at))


def take_sweep_request(connection: Connection) -> str | None:
    """The pending sweep request (consumed), or None."""
    request = read_meta(connection, SWEEP_REQUEST_KEY)
    if request is not None:
        connection.execute(delete(schema.meta).where(schema.meta.c.key == SWEEP_REQUEST_KEY))
    return request


def write_sweep_done(connection: Connection, request: str) -> None:
    """The sweep asked for by ``request`` has been committed."""
    write_meta(connection, SWEEP_DONE_KEY, request)


# --- scoring --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingPosting:
    posting_number: str
    event_seq: int


def pending_postings(connection: Connection, limit: int) -> list[PendingPosting]:
    """Open postings with records not yet scored, the longest waiting first."""
    table = schema.postings
    rows = connection.execute(
        select(table.c.posting_number, table.c.event_seq)
        .where(table.c.pending)
        .order_by(table.c.scored_seq, table.c.posting_number)
        .limit(limit)
    )
    return [PendingPosting(row.posting_number, row.event_seq) for row in rows]


def open_postings(connection: Connection) -> list[PendingPosting]:
    """Every open posting (the sweep scores them all)."""
    table = schema.postings
    rows = connection.execute(
        select(table.c.posting_number, table.c.event_seq)
        .where(table.c.is_open)
        .order_by(table.c.posting_number)
    )
    return [PendingPosting(row.posting_number, row.event_seq) for row in rows]


@dataclass
class ScoreInputs:
    """What a score request about one posting holds, as the book has it."""

    posting: dict[str, Any]
    pushes: list[dict[str, Any]] = field(default_factory=list)
    prices: list[dict[str, Any]] = field(default_factory=list)
    tracking: list[dict[str, Any]] = field(default_factory=list)


def in_chunks(values: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def score_inputs(connection: Connection, numbers: Sequence[str]) -> dict[str, ScoreInputs]:
    """The records of each posting in ``numbers`` the book holds, in the order received.

    A posting's own pushes and scans, and the card-edit pushes and price rows of its offers
    (from the row in force at its order time: :func:`_prices_since`): what
    ``cancel_risk.examples.build_score_request`` takes from an archive.
    """
    inputs: dict[str, ScoreInputs] = {}
    offers_of: dict[str, list[str]] = {}
    for chunk in in_chunks(list(numbers)):
        for row in connection.execute(
            select(schema.postings.c.posting_number, schema.postings.c.body).where(
                schema.postings.c.posting_number.in_(chunk)
            )
        ):
            inputs[row.posting_number] = ScoreInputs(orjson.loads(row.body))
        for row in connection.execute(
            select(schema.posting_offers).where(schema.posting_offers.c.posting_number.in_(chunk))
        ):
            offers_of.setdefault(row.posting_number, []).append(row.offer_id)
        for row in connection.execute(
            select(schema.pushes.c.posting_number, schema.pushes.c.body)
            .where(schema.pushes.c.posting_number.in_(chunk))
            .order_by(schema.pushes.c.id)
        ):
            if row.posting_number in inputs:
                inputs[row.posting_number].pushes.append(orjson.loads(row.body))
        for row in connection.execute(
            select(schema.scans.c.posting_number, schema.scans.c.body)
            .where(schema.scans.c.posting_number.in_(chunk))
            .order_by(schema.scans.c.id)
        ):
            if row.posting_number in inputs:
                inputs[row.posting_number].tracking.append(orjson.loads(row.body))
    offers = sorted({offer for held in offers_of.values() for offer in held})
    edits: dict[str, list[dict[str, Any]]] = {}
    price_rows: dict[str, list[tuple[int | None, dict[str, Any]]]] = {}
    for chunk in in_chunks(offers):
        for row in connection.execute(
            select(schema.pushes.c.offer_id, schema.pushes.c.body)
            .where(schema.pushes.c.offer_id.in_(chunk))
            .order_by(schema.pushes.c.id)
        ):
            edits.setdefault(row.offer_id, []).append(orjson.loads(row.body))
        for row in connection.execute(
            select(schema.prices.c.offer_id, schema.prices.c.at, schema.prices.c.body)
            .where(schema.prices.c.offer_id.in_(chunk))
            .order_by(schema.prices.c.id)
        ):
            price_rows.setdefault(row.offer_id, []).append((row.at, orjson.loads(row.body)))
    for number, held in offers_of.items():
        if number not in inputs:
            continue
        ordered_at = order_time(inputs[number].posting)
        for offer in sorted(held):
            inputs[number].pushes.extend(edits.get(offer, ()))
            inputs[number].prices.extend(_prices_since(price_rows.get(offer, ()), ordered_at))
    return inputs


def order_time(posting: Mapping[str, Any]) -> int | None:
    """The posting's order time as the ingestion reads it (FBO: ``created_at``), if canonical."""
    given = posting.get("in_process_at")
    return _time_or_none(given if given else posting.get("created_at"))


def _prices_since(
    rows: Sequence[tuple[int | None, dict[str, Any]]], ordered_at: int | None
) -> list[dict[str, Any]]:
    """An offer's price rows from the one in force at the order time on (with every row of
    that moment): what the price features read (the price at purchase, the changes after it,
    the price at ``as_of``). Earlier rows change no feature; a shop's years of price log
    would otherwise travel with every posting. Rows whose time is not canonical are kept."""
    if ordered_at is None:
        return [body for _, body in rows]
    in_force = max((at for at, _ in rows if at is not None and at <= ordered_at), default=None)
    if in_force is None:
        return [body for _, body in rows]
    return [body for at, body in rows if at is None or at >= in_force]


@dataclass(frozen=True)
class AlertRule:
    """When a score raises an alert: entering ``level`` (or above), or, with ``step`` > 0,
    each time the probability climbs into a higher band of width ``step``."""

    level: str = "high"
    step: float = 0.0
    levels: tuple[str, ...] = ("low", "medium", "high")

    def keys(self, previous: tuple[str, float] | None, level: str, probability: float) -> list[str]:
        rank = self.levels.index
        keys = []
        threshold = rank(self.level)
        if rank(level) >= threshold and (previous is None or rank(previous[0]) < threshold):
            keys.append(level)
        if self.step > 0:
            band = int(probability / self.step)
            before = -1 if previous is None else int(previous[1] / self.step)
            if band > before and previous is not None:
                keys.append(f"rise:{band * self.step:.2f}")
        return keys


@dataclass(frozen=True)
class ScoreRecord:
    """One score to keep (``explanations``: language -> the explanation as JSON-ready dict)."""

    posting_number: str
    event_seq: int
    as_of: int
    trigger: str
    model_name: str
    model_version: str | None
    probability: float
    risk_level: str
    explanations: dict[str, Any]


@dataclass(frozen=True)
class Unscored:
    """A posting the scorer could not score at ``as_of``: closed, or why it is unusable."""

    posting_number: str
    event_seq: int
    closed: bool
    note: str


def record_scores(
    connection: Connection,
    scored: Sequence[ScoreRecord],
    unscored: Sequence[Unscored],
    *,
    scored_at: int,
    rule: AlertRule,
    channels: Sequence[str],
) -> list[int]:
    """Keep the scores, update each posting's latest one, close what is closed, and put the
    alerts the scores call for into the outbox (once per posting, alert key and channel).

    A posting stays pending if a record arrived while it was being scored. Returns the ids of
    the new alerts.
    """
    table = schema.postings
    previous: dict[str, tuple[str, float]] = {}
    numbers = [record.posting_number for record in scored]
    for chunk in in_chunks(numbers):
        for row in connection.execute(
            select(table.c.posting_number, table.c.risk_level, table.c.probability).where(
                table.c.posting_number.in_(chunk), table.c.risk_level.is_not(None)
            )
        ):
            previous[row.posting_number] = (row.risk_level, row.probability)
    alert_rows = []
    for record in scored:
        explained = record.explanations.get("en") or {}
        reasons = explained.get("reasons") or []
        score_id = connection.execute(
            schema.scores.insert()
            .values(
                posting_number=record.posting_number,
                as_of=record.as_of,
                scored_at=scored_at,
                trigger=record.trigger,
                model_name=record.model_name,
                model_version=record.model_version,
                probability=record.probability,
                risk_level=record.risk_level,
                explanations=_dumps(record.explanations),
            )
            .returning(schema.scores.c.id)
        ).scalar_one()
        connection.execute(
            update(table)
            .where(table.c.posting_number == record.posting_number)
            .values(
                score_id=score_id,
                scored_as_of=record.as_of,
                probability=record.probability,
                risk_level=record.risk_level,
                note=None,
                scored_seq=record.event_seq,
                pending=table.c.event_seq > record.event_seq,
                decision=explained.get("decision"),
                first_reason=reasons[0]["code"] if reasons else None,
                expected_saving=explained.get("expected_saving"),
            )
        )
        for key in rule.keys(
            previous.get(record.posting_number), record.risk_level, record.probability
        ):
            alert_rows.extend(
                {
                    "posting_number": record.posting_number,
                    "alert_key": key,
                    "channel": channel,
                    "score_id": score_id,
                    "created_at": scored_at,
                    "attempts": 0,
                    "next_attempt_at": scored_at,
                }
                for channel in channels
            )
    for record in unscored:
        values: dict[str, Any] = {
            "note": record.note,
            "scored_seq": record.event_seq,
            "pending": table.c.event_seq > record.event_seq,
        }
        if record.closed:
            values.update(is_open=False, pending=False)
        connection.execute(
            update(table).where(table.c.posting_number == record.posting_number).values(**values)
        )
    alert_ids: list[int] = []
    for row in alert_rows:
        inserted = connection.execute(
            _insert(connection, schema.alerts)
            .values(**row)
            .on_conflict_do_nothing(index_elements=["posting_number", "alert_key", "channel"])
            .returning(schema.alerts.c.id)
        ).scalar_one_or_none()
        if inserted is not None:
            alert_ids.append(inserted)
    return alert_ids


# --- reading --------------------------------------------------------------------------------------


def _score_dict(row: Any, lang: str) -> dict[str, Any]:
    explanations = orjson.loads(row.explanations)
    return {
        "as_of": iso_time(row.as_of),
        "scored_at": iso_time(row.scored_at),
        "trigger": row.trigger,
        "model": {"name": row.model_name, "version": row.model_version},
        "probability": row.probability,
        "risk_level": row.risk_level,
        "explanation": explanations.get(lang) or explanations.get("en"),
    }


def posting_view(
    connection: Connection, posting_number: str, lang: str, history_limit: int = 500
) -> dict[str, Any] | None:
    """A posting's state, latest score (reasons, actions, decision) and risk history."""
    table = schema.postings
    row = connection.execute(select(table).where(table.c.posting_number == posting_number)).first()
    if row is None:
        return None
    history = list(
        connection.execute(
            select(schema.scores)
            .where(schema.scores.c.posting_number == posting_number)
            .order_by(schema.scores.c.id.desc())
            .limit(history_limit)
        )
    )
    history.reverse()
    latest = _score_dict(history[-1], lang) if history else None
    counts = {
        "pushes": _count(connection, schema.pushes, schema.pushes.c.posting_number, posting_number),
        "scans": _count(connection, schema.scans, schema.scans.c.posting_number, posting_number),
    }
    return {
        "posting_number": posting_number,
        "status": orjson.loads(row.body).get("status"),
        "open": row.is_open,
        "pending": row.pending,
        "note": row.note,
        "received_at": iso_time(row.received_at),
        "records": counts,
        "score": latest,
        "history": [
            {
                "as_of": iso_time(h.as_of),
                "probability": h.probability,
                "risk_level": h.risk_level,
                "trigger": h.trigger,
                "model_version": h.model_version,
                "first_reason": _first_reason(h.explanations),
            }
            for h in history
        ],
    }


def _first_reason(explanations: str) -> str | None:
    reasons = (orjson.loads(explanations).get("en") or {}).get("reasons") or []
    return reasons[0]["code"] if reasons else None


def _count(connection: Connection, table: Any, column: Any, value: str) -> int:
    return int(
        connection.execute(
            select(func.count()).select_from(table).where(column == value)
        ).scalar_one()
    )


def latest_explanations(
    connection: Connection, score_ids: Sequence[int | None], lang: str
) -> dict[int, dict[str, Any]]:
    """The explanation in ``lang`` (English when it has none) of each score id given."""
    found: dict[int, dict[str, Any]] = {}
    for chunk in in_chunks([i for i in score_ids if i is not None]):  # type: ignore[arg-type]
        for score in connection.execute(
            select(schema.scores.c.id, schema.scores.c.explanations).where(
                schema.scores.c.id.in_(chunk)
            )
        ):
            held = orjson.loads(score.explanations)
            found[score.id] = held.get(lang) or held.get("en")
    return found


def list_postings(
    connection: Connection,
    *,
    risk: str | None,
    include_closed: bool,
    limit: int,
    after: str | None,
    lang: str,
) -> list[dict[str, Any]]:
    """Postings by posting number (keyset pages: ``after`` the last one of the previous page)."""
    table = schema.postings
    query = select(table).order_by(table.c.posting_number).limit(limit)
    if risk is not None:
        query = query.where(table.c.risk_level == risk)
    if not include_closed:
        query = query.where(table.c.is_open)
    if after is not None:
        query = query.where(table.c.posting_number > after)
    rows = list(connection.execute(query))
    explanations = latest_explanations(connection, [row.score_id for row in rows], lang)
    listed = []
    for row in rows:
        explanation = explanations.get(row.score_id)
        reasons = (explanation or {}).get("reasons") or []
        actions = (explanation or {}).get("actions") or []
        listed.append(
            {
                "posting_number": row.posting_number,
                "open": row.is_open,
                "probability": row.probability,
                "risk_level": row.risk_level,
                "as_of": None if row.scored_as_of is None else iso_time(row.scored_as_of),
                "first_reason": reasons[0] if reasons else None,
                "first_action": actions[0] if actions else None,
                "note": row.note,
            }
        )
    return listed


def book_status(connection: Connection) -> dict[str, Any]:
    """Counts of the book, its clock and last sweep (for ``/v1/live/status`` and the tests)."""
    table = schema.postings

    def count(query: Any) -> int:
        return int(connection.execute(query).scalar_one())

    levels = {
        row.risk_level: int(row.n)
        for row in connection.execute(
            select(table.c.risk_level, func.count().label("n"))
            .where(table.c.is_open, table.c.risk_level.is_not(None))
            .group_by(table.c.risk_level)
        )
    }
    clock = read_clock(connection)
    sweep = read_last_sweep(connection)
    return {
        "postings": count(select(func.count()).select_from(table)),
        "open": count(select(func.count()).select_from(table).where(table.c.is_open)),
        "pending": count(select(func.count()).select_from(table).where(table.c.pending)),
        "open_by_risk": levels,
        "pushes": count(select(func.count()).select_from(schema.pushes)),
        "prices": count(select(func.count()).select_from(schema.prices)),
        "scans": count(select(func.count()).select_from(schema.scans)),
        "scores": count(select(func.count()).select_from(schema.scores)),
        "alerts": count(select(func.count()).select_from(schema.alerts)),
        "alerts_unsent": count(
            select(func.count()).select_from(schema.alerts).where(schema.alerts.c.sent_at.is_(None))
        ),
        "clock": None if clock is None else iso_time(clock),
        "last_sweep": None if sweep is None else iso_time(sweep),
        "sweep_requested": read_meta(connection, SWEEP_REQUEST_KEY),
        "sweep_done": read_meta(connection, SWEEP_DONE_KEY),
    }


# --- the outbox -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DueAlert:
    """An alert to send now, with the score that raised it."""

    id: int
    posting_number: str
    alert_key: str
    channel: str
    attempts: int
    as_of: int
    probability: float
    risk_level: str
    explanations: dict[str, Any]


def due_alerts(connection: Connection, now: int, limit: int = 100) -> list[DueAlert]:
    """Unsent alerts whose next attempt is due, oldest first."""
    alerts, scores = schema.alerts, schema.scores
    rows = connection.execute(
        select(
            alerts.c.id,
            alerts.c.posting_number,
            alerts.c.alert_key,
            alerts.c.channel,
            alerts.c.attempts,
            scores.c.as_of,
            scores.c.probability,
            scores.c.risk_level,
            scores.c.explanations,
        )
        .join(scores, scores.c.id == alerts.c.score_id)
        .where(alerts.c.sent_at.is_(None), alerts.c.next_attempt_at <= now)
        .order_by(alerts.c.next_attempt_at, alerts.c.id)
        .limit(limit)
    )
    return [
        DueAlert(
            row.id,
            row.posting_number,
            row.alert_key,
            row.channel,
            row.attempts,
            row.as_of,
            row.probability,
            row.risk_level,
            orjson.loads(row.explanations),
        )
        for row in rows
    ]


def mark_alert_sent(connection: Connection, alert_id: int, at: int) -> None:
    connection.execute(
        update(schema.alerts)
        .where(schema.alerts.c.id == alert_id)
        .values(sent_at=at, attempts=schema.alerts.c.attempts + 1, last_error=None)
    )


def mark_alert_failed(
    connection: Connection, alert_id: int, error: str, next_attempt_at: int
) -> None:
    connection.execute(
        update(schema.alerts)
        .where(schema.alerts.c.id == alert_id)
        .values(
            attempts=schema.alerts.c.attempts + 1,
            next_attempt_at=next_attempt_at,
            last_error=error[:1000],
        )
    )


def record_channel(connection: Connection, channel: str, at: int, error: str | None) -> None:
    """A delivery to ``channel`` succeeded (``error`` None) or failed."""
    table = schema.channels
    if error is None:
        values: dict[str, Any] = {"last_ok_at": at, "consecutive_failures": 0}
        failures_on_insert = 0
    else:
        values = {
            "last_error_at": at,
            "last_error": error[:1000],
            "consecutive_failures": table.c.consecutive_failures + 1,
        }
        failures_on_insert = 1
    inserted = {"channel": channel, "consecutive_failures": failures_on_insert}
    inserted.update({k: v for k, v in values.items() if k != "consecutive_failures"})
    statement = _insert(connection, table).values(**inserted)
    connection.execute(statement.on_conflict_do_update(index_elements=["channel"], set_=values))


@dataclass(frozen=True)
class ChannelHealth:
    channel: str
    last_ok_at: int | None
    last_error_at: int | None
    last_error: str | None
    consecutive_failures: int
    unsent: int

    @property
    def failing(self) -> bool:
        return self.consecutive_failures > 0


def channel_health(connection: Connection, names: Iterable[str]) -> list[ChannelHealth]:
    """Each configured channel's last delivery outcome and its unsent alerts."""
    held = {row.channel: row for row in connection.execute(select(schema.channels))}
    unsent = {
        row.channel: int(row.n)
        for row in connection.execute(
            select(schema.alerts.c.channel, func.count().label("n"))
            .where(schema.alerts.c.sent_at.is_(None))
            .group_by(schema.alerts.c.channel)
        )
    }
    health = []
    for name in names:
        row = held.get(name)
        health.append(
            ChannelHealth(
                name,
                None if row is None else row.last_ok_at,
                None if row is None else row.last_error_at,
                None if row is None else row.last_error,
                0 if row is None else row.consecutive_failures,
                unsent.get(name, 0),
            )
        )
    return health


# --- the archive ----------------------------------------------------------------------------------


def iter_records(connection: Connection, table: Any) -> Iterator[dict[str, Any]]:
    """The stored records of ``schema.pushes``, ``prices`` or ``scans`` in the order received;
    for ``schema.postings``, the held posting objects by posting number."""
    order = table.c.posting_number if table is schema.postings else table.c.id
    for row in connection.execution_options(yield_per=5000).execute(
        select(table.c.body).order_by(order)
    ):
        yield orjson.loads(row.body)


def iso_time(ns: int) -> str:
    """UTC nanoseconds as ISO-8601 with microseconds and ``Z`` (the contract's form)."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
