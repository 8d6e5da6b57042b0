"""Alembic environment: runs migrations on the connection the Store hands over (or the configured URL).

Every migration run is one transaction under the store's migration lock (``bench.store.db.migration_transaction``):
the Store opens it around this environment; a plain ``alembic`` run against a URL opens it here.
"""

from alembic import context
from sqlalchemy import create_engine

from bench.store.db import migration_transaction
from bench.store.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn, migration_transaction(conn):
            _run(conn)
    finally:
        engine.dispose()


def _run(connection) -> None:
    # render_as_batch: SQLite has almost no ALTER TABLE, so later migrations rebuild tables in batch mode.
    # transaction_per_migration=False: all revisions up to head in one transaction, so an interrupted upgrade
    # leaves the store at the revision it started from, never between two.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
