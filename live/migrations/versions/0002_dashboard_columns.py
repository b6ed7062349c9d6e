"""The dashboard's columns on the postings: order time, carrier, region, payment (from the
posting object, filled here for the postings already held) and the latest score's decision,
first reason and expected saving (filled by the next score: the worker sweeps at start).

Revision ID: 0002
Revises: 0001
"""

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_FACETS = ("ordered_at", "carrier", "region", "payment")
# The open orders' sorts and filters: each served by an index of its own.
_INDEXES = {
    "probability": "probability",
    "ordered": "ordered_at",
    "saving": "expected_saving",
    "carrier": "carrier",
    "region": "region",
    "decision": "decision",
}


def upgrade() -> None:
    from live.book import posting_facets

    with op.batch_alter_table("book_postings") as batch:
        batch.add_column(sa.Column("ordered_at", sa.BigInteger))
        batch.add_column(sa.Column("carrier", sa.String(256)))
        batch.add_column(sa.Column("region", sa.String(256)))
        batch.add_column(sa.Column("payment", sa.String(256)))
        batch.add_column(sa.Column("decision", sa.String(32)))
        batch.add_column(sa.Column("first_reason", sa.String(32)))
        batch.add_column(sa.Column("expected_saving", sa.Float))
    for name, column in _INDEXES.items():
        op.create_index(f"ix_book_postings_open_{name}", "book_postings", ["is_open", column])
    postings = sa.table(
        "book_postings",
        sa.column("posting_number"),
        sa.column("body"),
        *(sa.column(name) for name in _FACETS),
    )
    connection = op.get_bind()
    held = connection.execute(sa.select(postings.c.posting_number, postings.c.body)).all()
    for number, body in held:
        connection.execute(
            postings.update()
            .where(postings.c.posting_number == number)
            .values(**posting_facets(orjson.loads(body)))
        )


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(f"ix_book_postings_open_{name}", "book_postings")
    with op.batch_alter_table("book_postings") as batch:
        for name in (*_FACETS, "decision", "first_reason", "expected_saving"):
            batch.drop_column(name)
