"""Opening the store: URL resolution, SQLite pragmas, read-only opening, migrations to head, sessions.

The store runs on SQLite (one machine) or PostgreSQL (a server every worker of a cluster reaches, through the
psycopg 3 driver: ``pip install 'apbench[postgres]'``). Anything that stops a store from opening (a missing
driver or file, a stopped server, a schema newer than this code) raises :class:`StoreError` with one line that
names the problem and the fix.

Creating or migrating a store is one transaction under a lock (:func:`migration_transaction`): an interrupted
creation (a full disk, a killed process) leaves the store as it was, and processes that first open one new store
at once wait for each other instead of racing to create the same tables. A store left half-created by an older
apbench (tables but no schema revision) is repaired when its tables hold no rows, else refused with the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select, table
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from bench.store.schema import Base

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///results.db"
MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000
# Seconds to wait for a PostgreSQL server before reporting it unreachable (psycopg waits forever by default).
PG_CONNECT_TIMEOUT_S = 30
SUPPORTED = "SQLite (sqlite:///results.db or a file path) or PostgreSQL (postgresql://user@host/db)"
POSTGRES_INSTALL = "pip install 'apbench[postgres]'"
# The key of the PostgreSQL advisory lock every creation or migration of a store holds (any fixed 64-bit number;
# advisory locks are per database, so stores in other databases of the same server do not wait for each other).
PG_MIGRATION_LOCK = 0x61706265_6E636801  # "apbench" + 1


class StoreError(RuntimeError):
    """The store cannot be opened or used as asked; the message is one line naming the problem and the fix."""


class InvalidDatabaseURL(StoreError, ValueError):
    """``--db`` / ``$BENCH_DB`` is not a URL of a database the store runs on."""


def _invalid(url: str, why: str) -> InvalidDatabaseURL:
    return InvalidDatabaseURL(
        f"invalid database URL {url!r}: {why}; use a SQLAlchemy URL such as sqlite:///results.db "
        "or postgresql://user@host/db (option --db or $BENCH_DB)"
    )


def resolve_db_url(db: str | None = None) -> str:
    """The store's SQLAlchemy URL: ``--db``, else ``$BENCH_DB``, else ``sqlite:///results.db``.

    A bare file path is accepted and turned into a SQLite URL; an empty ``$BENCH_DB`` counts as unset.
    ``postgresql://`` (and ``postgres://``) select the psycopg 3 driver, ``postgresql+psycopg://``.

    Raises:
        InvalidDatabaseURL: an empty ``db``, a malformed URL, or a database other than SQLite and PostgreSQL.
    """
    if db is not None and not db.strip():
        raise _invalid(db, "it is empty")
    url = db or os.environ.get("BENCH_DB", "").strip() or DEFAULT_DB_URL
    if "://" not in url:
        url = f"sqlite:///{url}"
    # SQLAlchemy's bare postgresql:// means psycopg2, which apbench does not install.
    url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)
    try:
        parsed = make_url(url)
        # get_dialect() also rejects unknown database kinds (NoSuchModuleError is an ArgumentError).
        parsed.get_dialect()
    except (ArgumentError, ValueError) as err:
        raise _invalid(url, str(err)) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise _invalid(url, f"the store runs on {SUPPORTED}, not {parsed.get_backend_name()}")
    return url


def url_password(url: str | URL) -> str | None:
    """The password a URL gives the driver, in its user part or as a ``?password=`` query parameter; None if none."""
    parsed = make_url(url)
    return parsed.password or parsed.query.get("password") or None


def shown_url(url: str | URL) -> str:
    """The URL with any password masked (user part and ``?password=``), for messages and logs."""
    try:
        parsed = make_url(url)
        masked = "password" in parsed.query
        if masked:
            parsed = parsed.update_query_dict({"password": "MASKED"})
        text = parsed.render_as_string(hide_password=True)
        return text.replace("password=MASKED", "password=***") if masked else text
    except (ArgumentError, ValueError):
        return str(url)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the site builder, `bench results`) run while an evaluation writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_read_only_pragmas(dbapi_connection, _record) -> None:
    # No journal_mode here: setting it writes to the file, which a read-only store must never see.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would read a %-escaped password in the URL as a reference.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def migration_transaction(conn: Connection) -> Iterator[None]:
    """One transaction on ``conn`` holding the store's migration lock; DDL run inside it commits or rolls back whole.

    PostgreSQL's DDL is transactional; ``pg_advisory_xact_lock`` makes concurrent creators or migrators of one
    database wait for each other and is released with the transaction. SQLite's DDL is transactional too, but
    pysqlite's legacy transaction handling only opens a transaction before INSERT, UPDATE and DELETE, so every
    CREATE TABLE would run, and commit, on its own. With the DBAPI connection in autocommit mode we emit
    ``BEGIN IMMEDIATE`` ourselves (SQLAlchemy's documented recipe for transactional DDL on pysqlite): the DDL stays
    in our transaction, and the write lock, taken at once, makes a second creator wait on the busy timeout.
    ``conn`` must not be in a transaction yet.
    """
    if conn.dialect.name != "sqlite":
        with conn.begin():
            conn.execute(select(func.pg_advisory_xact_lock(PG_MIGRATION_LOCK)))
            yield
        return
    dbapi = conn.connection.driver_connection
    saved = dbapi.isolation_level
    dbapi.isolation_level = None
    try:
        # SQLAlchemy's begin emits nothing on pysqlite; its commit and rollback end the transaction BEGIN opened.
        with conn.begin():
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield
    finally:
        # A connection that broke meanwhile is closed and discarded by the pool; nothing left to restore.
        with contextlib.suppress(sqlite3.Error):
            dbapi.isolation_level = saved


def _store_tables(conn: Connection) -> dict[str, int]:
    """The store's own tables present in the database, dependents first, with their row counts."""
    present = set(inspect(conn).get_table_names())
    return {
        t.name: conn.execute(select(func.count()).select_from(table(t.name))).scalar_one()
        for t in reversed(Base.metadata.sorted_tables)
        if t.name in present
    }


def _sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or a URL that is already a sqlite3 URI."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri") or database.startswith("file:"):
        return None
    return Path(database)


def _can_write(path: Path) -> bool:
    # The folder too: SQLite writes its -wal, -shm and journal files next to the store.
    # os.access also answers False on a read-only file system (EROFS), even for root.
    folder = path.parent if str(path.parent) else Path(".")
    return (os.access(path, os.W_OK) or not path.exists()) and os.access(folder, os.W_OK)


def _read_only_uri(path: Path) -> str:
    uri = path.resolve().as_uri() + "?mode=ro"
    # A WAL store in a folder we cannot write has no -shm we could create; without a -wal file everything is
    # in the main file, so SQLite may read it as immutable (sqlite.org/wal.html, "Read-Only Databases").
    folder_writable = os.access(path.resolve().parent, os.W_OK)
    if not folder_writable and not Path(f"{path}-wal").exists():
        uri += "&immutable=1"
    return uri


class Store:
    """A handle on one results database, migrated to the newest schema when opened.

    Args:
        db: SQLAlchemy URL or SQLite file path; see :func:`resolve_db_url`.
        migrate: upgrade the schema to head (Alembic) on open.
        read_only: for commands that only read: the store must already exist at the newest schema, is never
            created, migrated or written (SQLite opens the file read-only; PostgreSQL sessions are read-only).
            A SQLite file or folder this process cannot write is opened read-only whatever this says.

    Raises:
        StoreError: the store cannot be opened as asked (see the module doc).
    """

    def __init__(self, db: str | None = None, *, migrate: bool = True, read_only: bool = False) -> None:
        self.url = resolve_db_url(db)
        parsed = make_url(self.url)
        kwargs: dict = {}
        pragmas = _sqlite_pragmas
        self.read_only = read_only
        if parsed.get_backend_name() == "sqlite":
            path = _sqlite_file(parsed)
            if path is not None:
                self._check_sqlite_path(path)
                self.read_only = read_only or not _can_write(path)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
            if self.read_only and path is not None:
                uri = _read_only_uri(path)
                kwargs["creator"] = lambda: sqlite3.connect(
                    uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
                )
            if self.read_only:
                pragmas = _sqlite_read_only_pragmas
        else:
            args: dict = {}
            if "connect_timeout" not in parsed.query:
                args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
            if read_only:
                args["options"] = "-c default_transaction_read_only=on"
            kwargs["connect_args"] = args
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(self.url, **kwargs)
        except ImportError as err:
            raise self._missing_driver(parsed, err) from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate or self.read_only:
            try:
                self._check_revision(upgrade=migrate and not self.read_only)
            except BaseException:
                self.engine.dispose()
                raise

    def _check_sqlite_path(self, path: Path) -> None:
        if path.is_dir():
            raise StoreError(f"{path} is a folder, not a store; give a file such as {path / 'results.db'}")
        if path.exists():
            return
        if self.read_only:
            raise StoreError(f"no store at {path}; create one with bench db upgrade --db {path} or run bench evaluate")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise StoreError(f"cannot create the store {path}: folder {folder} does not exist; create it first")

    @staticmethod
    def _missing_driver(url: URL, err: ImportError) -> StoreError:
        if url.get_backend_name() == "postgresql":
            return StoreError(
                f"the PostgreSQL driver {url.get_driver_name()} is not installed ({err}); "
                f"install it with {POSTGRES_INSTALL} and use a postgresql:// URL"
            )
        return StoreError(f"the database driver for {url.drivername} is not installed ({err})")

    def _unreachable(self, err: DBAPIError) -> StoreError:
        reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
        if self.engine.dialect.name == "sqlite":
            path = _sqlite_file(make_url(self.url))
            where = path if path is not None else self.url
            if "file is not a database" in reason:
                return StoreError(f"{where} is not a SQLite database ({reason}); give a results store or a new file")
            return StoreError(
                f"cannot open the store {where}: {reason}; check the file, and the free space on its disk"
            )
        return StoreError(
            f"cannot connect to the store {shown_url(self.url)}: {reason}; "
            "check that the server runs and that the URL's host, port, user and database are right"
        )

    def _where(self) -> str:
        """The store as messages name it: a SQLite file's path, else the URL with any password masked."""
        path = _sqlite_file(make_url(self.url)) if self.engine.dialect.name == "sqlite" else None
        return str(path) if path is not None else shown_url(self.url)

    def _half_created(self, tables: dict[str, int]) -> StoreError:
        where = self._where()
        names = ", ".join(sorted(tables))
        rows = sum(tables.values())
        if rows == 0:
            return StoreError(
                f"the store {where} was left half-created by an interrupted creation (tables {names}, no rows, no "
                f"schema revision); bench db upgrade --db {where} repairs it"
            )
        aside = "move the file aside" if self.engine.dialect.name == "sqlite" else "use a new database (or drop them)"
        return StoreError(
            f"the store {where} holds tables {names} with {rows} rows but no schema revision (alembic_version is empty "
            f"or missing), so apbench cannot tell their schema; {aside} and run bench db upgrade --db {where}"
        )

    def _check_revision(self, *, upgrade: bool) -> None:
        """Refuse a schema this code does not know; migrate to head when ``upgrade``, else require head."""
        cfg = alembic_config(self.url)
        script = ScriptDirectory.from_config(cfg)
        head = script.get_current_head()
        try:
            # Connecting and reading alembic_version is where a stopped server, a wrong database name, a file
            # that is not SQLite or an unreadable one shows up.
            with self.engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
                leftovers = _store_tables(conn) if current is None and not upgrade else {}
        except DBAPIError as err:
            raise self._unreachable(err) from None
        if current == head:
            return
        self._check_known(current, script)
        if not upgrade:
            if leftovers:
                raise self._half_created(leftovers)
            if current is None:
                raise StoreError(
                    f"no store at {shown_url(self.url)}; create one with bench db upgrade --db "
                    f"{shown_url(self.url)} or run bench evaluate"
                )
            raise StoreError(
                f"the store {shown_url(self.url)} is at schema revision {current}, older than this apbench's "
                f"{head}; upgrade it with bench db upgrade --db {shown_url(self.url)}"
            )
        self._migrate(cfg, script)

    def _check_known(self, current: str | None, script: ScriptDirectory) -> None:
        if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
            raise StoreError(
                f"the store {shown_url(self.url)} is at schema revision {current}, which this apbench does not "
                "know (written by a newer version?); upgrade apbench, or use another --db"
            )

    def _migrate(self, cfg: Config, script: ScriptDirectory) -> None:
        """Create or migrate the store to head in one transaction under the migration lock."""
        dropped: list[str] = []
        try:
            with self.engine.connect() as conn, migration_transaction(conn):
                # Another process may have created or migrated the store while this one waited for the lock.
                current = MigrationContext.configure(conn).get_current_revision()
                if current == script.get_current_head():
                    return
                self._check_known(current, script)
                if current is None:
                    dropped = self._drop_empty_leftovers(conn)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except DBAPIError as err:
            reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err).splitlines()[0]
            where = self._where()
            raise StoreError(
                f"could not create or migrate the store {where}: {reason}; it was left as it was (one transaction): "
                f"fix that (free disk space?) and run bench db upgrade --db {where} again"
            ) from None
        if dropped:  # said once the new store is committed, not before
            log.warning(
                "the store %s was left half-created by an interrupted creation (tables %s, no rows, no schema "
                "revision): dropped the empty tables and created it again",
                self._where(),
                ", ".join(sorted(dropped)),
            )

    def _drop_empty_leftovers(self, conn: Connection) -> list[str]:
        """Repair a store an older apbench left half-created: its tables go when they hold no rows at all."""
        leftovers = _store_tables(conn)
        if any(leftovers.values()):
            raise self._half_created(leftovers)
        for name in leftovers:  # dependents first
            Base.metadata.tables[name].drop(conn)
        return list(leftovers)

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision (no-op when already there)."""
        if self.read_only:
            raise StoreError(f"the store {shown_url(self.url)} is open read-only; it cannot be migrated")
        self._check_revision(upgrade=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
