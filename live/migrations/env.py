"""Alembic's environment for the live order book: runs on the connection the book hands over.

The book (:func:`live.book.migrate`) passes its open connection in ``config.attributes``; the
version table is ``book_alembic_version``, so the book may share a database with MLflow's own
Alembic-managed tables.

Several processes may open a new book at once (service workers, replicas): the first to take
the database's lock migrates, the others wait for it and then find the schema current.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from live.schema import metadata

VERSION_TABLE = "book_alembic_version"
MIGRATION_LOCK_KEY = 0x626F6F6B  # "book": PostgreSQL advisory lock of the book's migrations

connection = context.config.attributes["connection"]
# Taken before the version table is read, held until the migration commits.
if connection.dialect.name == "postgresql":
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
elif (
    connection.dialect.name == "sqlite"
    and not connection.connection.driver_connection.in_transaction
):
    # pysqlite runs DDL outside any transaction: begin one, taking the write lock now.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
