"""The order book: postings, their records, scores, the alert outbox.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    )


def upgrade() -> None:
    op.create_table(
        "book_postings",
        sa.Column("posting_number", sa.String(64), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("is_open", sa.Boolean, nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("event_seq", sa.BigInteger, nullable=False),
        sa.Column("scored_seq", sa.BigInteger, nullable=False),
        sa.Column("pending", sa.Boolean, nullable=False),
        sa.Column("score_id", sa.BigInteger),
        sa.Column("scored_as_of", sa.BigInteger),
        sa.Column("probability", sa.Float),
        sa.Column("risk_level", sa.String(16)),
    )
    op.create_index("ix_book_postings_pending", "book_postings", ["pending"])
    op.create_index("ix_book_postings_open_risk", "book_postings", ["is_open", "risk_level"])
    op.create_table(
        "book_posting_offers",
        sa.Column("offer_id", sa.String(128), primary_key=True),
        sa.Column("posting_number", sa.String(64), primary_key=True),
    )
    op.create_table(
        "book_pushes",
        _id(),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("message_type", sa.String(64), nullable=False),
        sa.Column("posting_number", sa.String(64)),
        sa.Column("offer_id", sa.String(128)),
        sa.Column("event_at", sa.BigInteger),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_book_pushes_posting", "book_pushes", ["posting_number"])
    op.create_index("ix_book_pushes_offer", "book_pushes", ["offer_id"])
    op.create_table(
        "book_prices",
        _id(),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("offer_id", sa.String(128), nullable=False),
        sa.Column("at", sa.BigInteger),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_book_prices_offer", "book_prices", ["offer_id"])
    op.create_table(
        "book_scans",
        _id(),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("posting_number", sa.String(64), nullable=False),
        sa.Column("at", sa.BigInteger),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_book_scans_posting", "book_scans", ["posting_number"])
    op.create_table(
        "book_scores",
        _id(),
        sa.Column("posting_number", sa.String(64), nullable=False),
        sa.Column("as_of", sa.BigInteger, nullable=False),
        sa.Column("scored_at", sa.BigInteger, nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("model_version", sa.String(64)),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("risk_level", sa.String(16), nullable=False),
        sa.Column("explanations", sa.Text, nullable=False),
    )
    op.create_index("ix_book_scores_posting", "book_scores", ["posting_number", "id"])
    op.create_table(
        "book_alerts",
        _id(),
        sa.Column("posting_number", sa.String(64), nullable=False),
        sa.Column("alert_key", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("score_id", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
        sa.Column("sent_at", sa.BigInteger),
        sa.Column("last_error", sa.Text),
        sa.UniqueConstraint("posting_number", "alert_key", "channel", name="uq_book_alerts_once"),
    )
    op.create_index("ix_book_alerts_due", "book_alerts", ["sent_at", "next_attempt_at"])
    op.create_table(
        "book_channels",
        sa.Column("channel", sa.String(128), primary_key=True),
        sa.Column("last_ok_at", sa.BigInteger),
        sa.Column("last_error_at", sa.BigInteger),
        sa.Column("last_error", sa.Text),
        sa.Column("consecutive_failures", sa.Integer, nullable=False),
    )
    op.create_table(
        "book_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "book_meta",
        "book_channels",
        "book_alerts",
        "book_scores",
        "book_scans",
        "book_prices",
        "book_pushes",
        "book_posting_offers",
        "book_postings",
    ):
        op.drop_table(table)
