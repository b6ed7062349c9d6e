"""The live order book's tables, as SQLAlchemy Core metadata (SQLite and PostgreSQL alike).

Times are UTC nanoseconds in ``BIGINT`` columns (as everywhere in the project); records are
kept as the JSON text they arrived in, so that the archive (:mod:`live.archive`) writes them
back in the contract's formats. The schema is created and upgraded by the Alembic migrations
in ``live/migrations`` (:func:`live.book.migrate`); ``tests/test_live_book.py`` checks that the
migrated database and this metadata agree.

- ``book_postings``: one row per posting: the posting object the ingestion's merge would let
  win (the most progressed status, then the latest received), whether it is open, its re-score
  queue state (``event_seq``/``scored_seq``/``pending``), its latest score, and the columns the
  dashboard filters and sorts by.
- ``book_posting_offers``: which offers a posting holds (a price or card change re-scores them).
- ``book_pushes``, ``book_prices``, ``book_scans``: every record accepted, once: ``digest`` is
  the SHA-256 of the record's canonical JSON, so a retried or replayed record is stored once.
- ``book_scores``: every score with its moment, model version, risk and reasons (in every
  language), so a posting's risk history can be read back.
- ``book_alerts``: the outbox. One row per posting, alert key and channel (unique: an alert is
  raised once), sent at least once with retries and backoff.
- ``book_channels``: each alert channel's last success and failure, for ``/readyz``/metrics.
- ``book_meta``: small facts of the book (its clock, the last sweep, the latest cause analysis).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

postings = Table(
    "book_postings",
    metadata,
    Column("posting_number", String(64), primary_key=True),
    Column("body", Text, nullable=False),
    Column("progress", Integer, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("is_open", Boolean, nullable=False),
    Column("note", Text),
    Column("event_seq", BigInteger, nullable=False),
    Column("scored_seq", BigInteger, nullable=False),
    Column("pending", Boolean, nullable=False),
    Column("score_id", BigInteger),
    Column("scored_as_of", BigInteger),
    Column("probability", Float),
    Column("risk_level", String(16)),
    # What the dashboard filters and sorts by: from the posting object (order time, carrier,
    # region, payment) and from the latest score (decision, first reason, expected saving).
    Column("ordered_at", BigInteger),
    Column("carrier", String(256)),
    Column("region", String(256)),
    Column("payment", String(256)),
    Column("decision", String(32)),
    Column("first_reason", String(32)),
    Column("expected_saving", Float),
    Index("ix_book_postings_pending", "pending"),
    Index("ix_book_postings_open_risk", "is_open", "risk_level"),
    Index("ix_book_postings_open_probability", "is_open", "probability"),
    Index("ix_book_postings_open_ordered", "is_open", "ordered_at"),
    Index("ix_book_postings_open_saving", "is_open", "expected_saving"),
    Index("ix_book_postings_open_carrier", "is_open", "carrier"),
    Index("ix_book_postings_open_region", "is_open", "region"),
    Index("ix_book_postings_open_decision", "is_open", "decision"),
)

posting_offers = Table(
    "book_posting_offers",
    metadata,
    Column("offer_id", String(128), primary_key=True),
    Column("posting_number", String(64), primary_key=True),
)

pushes = Table(
    "book_pushes",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("digest", String(64), nullable=False, unique=True),
    Column("message_type", String(64), nullable=False),
    Column("posting_number", String(64)),
    Column("offer_id", String(128)),
    Column("event_at", BigInteger),
    Column("received_at", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    Index("ix_book_pushes_posting", "posting_number"),
    Index("ix_book_pushes_offer", "offer_id"),
)

prices = Table(
    "book_prices",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("digest", String(64), nullable=False, unique=True),
    Column("offer_id", String(128), nullable=False),
    Column("at", BigInteger),
    Column("received_at", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    Index("ix_book_prices_offer", "offer_id"),
)

scans = Table(
    "book_scans",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("digest", String(64), nullable=False, unique=True),
    Column("posting_number", String(64), nullable=False),
    Column("at", BigInteger),
    Column("received_at", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    Index("ix_book_scans_posting", "posting_number"),
)

scores = Table(
    "book_scores",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("posting_number", String(64), nullable=False),
    Column("as_of", BigInteger, nullable=False),
    Column("scored_at", BigInteger, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("model_name", String(256), nullable=False),
    Column("model_version", String(64)),
    Column("probability", Float, nullable=False),
    Column("risk_level", String(16), nullable=False),
    Column("explanations", Text, nullable=False),
    Index("ix_book_scores_posting", "posting_number", "id"),
)

alerts = Table(
    "book_alerts",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("posting_number", String(64), nullable=False),
    Column("alert_key", String(32), nullable=False),
    Column("channel", String(128), nullable=False),
    Column("score_id", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("sent_at", BigInteger),
    Column("last_error", Text),
    UniqueConstraint("posting_number", "alert_key", "channel", name="uq_book_alerts_once"),
    Index("ix_book_alerts_due", "sent_at", "next_attempt_at"),
)

channels = Table(
    "book_channels",
    metadata,
    Column("channel", String(128), primary_key=True),
    Column("last_ok_at", BigInteger),
    Column("last_error_at", BigInteger),
    Column("last_error", Text),
    Column("consecutive_failures", Integer, nullable=False),
)

meta = Table(
    "book_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
