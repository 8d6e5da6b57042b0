"""Opening the store: URL resolution, SQLite pragmas, migrations to head, sessions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_DB_URL = "sqlite:///results.db"
MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000


def resolve_db_url(db: str | None = None) -> str:
    """The store's SQLAlchemy URL: ``--db``, else ``$BENCH_DB``, else ``sqlite:///results.db``.

    A bare file path is accepted and turned into a SQLite URL.
    """
    url = db or os.environ.get("BENCH_DB") or DEFAULT_DB_URL
    if "://" not in url:
        url = f"sqlite:///{url}"
    try:
        # get_dialect() also rejects unknown database kinds (NoSuchModuleError is an ArgumentError).
        make_url(url).get_dialect()
    except (ArgumentError, ValueError) as err:
        raise ValueError(
            f"invalid database URL {url!r}: {err}; use a SQLAlchemy URL such as sqlite:///results.db "
            "or postgresql://user@host/db (option --db or $BENCH_DB)"
        ) from None
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the site builder, `bench results`) run while an evaluation writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


class Store:
    """A handle on one results database, migrated to the newest schema when opened.

    Args:
        db: SQLAlchemy URL or SQLite file path; see :func:`resolve_db_url`.
        migrate: upgrade the schema to head (Alembic) on open.
    """

    def __init__(self, db: str | None = None, *, migrate: bool = True) -> None:
        self.url = resolve_db_url(db)
        kwargs = {}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.upgrade()

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision (no-op when already there)."""
        cfg = alembic_config(self.url)
        head = ScriptDirectory.from_config(cfg).get_current_head()
        with self.engine.begin() as conn:
            if MigrationContext.configure(conn).get_current_revision() == head:
                return
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
