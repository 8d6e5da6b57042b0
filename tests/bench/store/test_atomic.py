"""Creating and migrating a store is atomic and serialised, on SQLite and on a real PostgreSQL server.

An interrupted creation (a full disk, an error or a SIGKILL partway through the migrations) must leave nothing that
blocks the next command; processes that first open one new store at once must all succeed; a store an older
apbench left half-created (tables but no schema revision) is repaired when empty and refused with the fix when not.
"""

from __future__ import annotations

import gc
import os
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic import command
from alembic.ddl.impl import DefaultImpl
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from bench.cli import main
from bench.provenance import utcnow
from bench.store import Model, Store, StoreError
from bench.store.db import alembic_config, migration_transaction
from bench.store.schema import Base
from tests.cli import one_line_error
from tests.paths import REPO_ROOT

STORE_TABLES = {t.name for t in Base.metadata.sorted_tables}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _state(url: str) -> tuple[set[str], list[str] | None]:
    """The store's own tables in the database and the rows of alembic_version (None: no such table).

    Read with a plain engine: opening a Store would migrate, which is what the tests want to see happen or not.
    """
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            versions = None
            if "alembic_version" in tables:
                versions = [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
        return tables & STORE_TABLES, versions
    finally:
        engine.dispose()


def _assert_usable_at_head(url: str) -> None:
    """The store opens, is at head, takes a row and reads it back."""
    store = Store(url)
    try:
        assert _state(url) == (STORE_TABLES, [_head()])
        with store.session() as s:
            s.add(
                Model(name="after", checkpoint_sha256="a" * 64, arch="small_cnn", dataset="digits", created_at=utcnow())
            )
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM models")).all() == [("after",)]
    finally:
        store.dispose()


def _run_python(code: str, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


# --- concurrent first openers ----------------------------------------------------------------------------------

# Each process imports first, says "ready", then waits for the go file: all six open the store within a few
# milliseconds of each other instead of one import time apart.
OPENER = textwrap.dedent(
    """
    import os, sys, time
    url, go, how = sys.argv[1:4]
    if how == "cli":
        from bench.cli import main
    else:
        from bench.store import Store
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    if how == "cli":
        main(["db", "upgrade", "--db", url])
    else:
        Store(url).dispose()
        print("opened")
    """
)


@pytest.mark.parametrize("trial", range(5))
def test_six_processes_first_opening_one_new_store_all_succeed(store_url, trial, tmp_path):
    go = tmp_path / f"go-{trial}"
    # Five open it through Store, one through `bench db upgrade`.
    hows = ["store"] * 5 + ["cli"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, store_url, str(go), how],
            cwd=REPO_ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for how in hows
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)
        go.touch()
        outcomes = [(proc.wait(timeout=300), proc.stdout.read(), proc.stderr.read()) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    for how, (code, out, err) in zip(hows, outcomes, strict=True):
        assert code == 0, err[-3000:]
        assert "Traceback" not in err and "Error" not in err, err[-3000:]
        assert ("is at the newest schema" if how == "cli" else "opened") in out
    _assert_usable_at_head(store_url)


# --- interrupted creations and upgrades --------------------------------------------------------------------------

# Opens a new store with Alembic's create_table patched: the third table's creation raises (a failed write) or
# SIGKILLs the process (a crash), after the first two tables were created in the database.
INTERRUPTED = textwrap.dedent(
    """
    import os, signal, sys
    from alembic.operations import Operations
    from bench.store import Store
    url, mode = sys.argv[1:3]
    real = Operations.create_table
    created = []

    def create_table(self, name, *columns, **kw):
        if len(created) == 2:
            print("interrupting after", created, flush=True)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device (injected)")
        created.append(name)
        return real(self, name, *columns, **kw)

    Operations.create_table = create_table
    Store(url)
    """
)


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_an_interrupted_creation_leaves_nothing_behind(store_url, mode):
    run = _run_python(INTERRUPTED, store_url, mode)
    assert "interrupting after ['models', 'evaluations']" in run.stdout, run.stderr[-3000:]
    if mode == "kill":
        assert run.returncode == -signal.SIGKILL
    else:
        assert run.returncode == 1 and "No space left on device (injected)" in run.stderr
    # The two tables created before the interruption went with the rolled-back transaction.
    assert _state(store_url) in [(set(), None), (set(), [])]
    _assert_usable_at_head(store_url)
    result = CliRunner().invoke(main, ["db", "upgrade", "--db", store_url])
    assert result.exit_code == 0, result.output


def _insert_model(conn, name: str, sha: str) -> None:
    """A model row in the columns every schema revision has."""
    conn.execute(
        text(
            "INSERT INTO models (name, checkpoint_sha256, method, arch, dataset, structure, measured_sparsity, "
            "layer_sparsity, params, nonzero_params, flops, nonzero_flops, source, reported, taxonomy, provenance, "
            "created_at) VALUES (:name, :sha, 'dense', 'small_cnn', 'digits', 'dense', 0.0, '{}', 1, 1, 1, 1, "
            "'local', '{}', '{}', '{}', :now)"
        ),
        {"name": name, "sha": sha, "now": utcnow()},
    )


def _store_at(url: str, revision: str) -> None:
    """A store at an older ``revision``, created as the Store creates one, with one model row."""
    store = Store(url, migrate=False)
    try:
        with store.engine.connect() as conn, migration_transaction(conn):
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        with store.engine.begin() as conn:
            _insert_model(conn, "old", "b" * 64)
    finally:
        store.dispose()


def _count_add_column(monkeypatch, url: str) -> list[tuple[str, str]]:
    """The columns the migrations from the base revision to head add, upgrading a base store at ``url``."""
    added = []
    real = DefaultImpl.add_column

    def add_column(self, table_name, column, **kw):
        added.append((table_name, column.name))
        return real(self, table_name, column, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(DefaultImpl, "add_column", add_column)
        Store(url).dispose()
    return added


def test_an_interrupted_upgrade_stays_at_the_revision_it_started_from(store_url, monkeypatch, tmp_path):
    base = ScriptDirectory.from_config(alembic_config(store_url)).get_base()
    rehearsal = f"sqlite:///{tmp_path / 'rehearsal.db'}"
    _store_at(rehearsal, base)
    columns = _count_add_column(monkeypatch, rehearsal)
    assert len(columns) >= 2, columns

    _store_at(store_url, base)
    state_before, columns_before = _state(store_url), _columns(store_url)
    assert state_before[1] == [base]
    seen = []
    real = DefaultImpl.add_column

    def add_column(self, table_name, column, **kw):
        # The last column of the chain fails, when every revision before its own was applied in this transaction.
        if len(seen) == len(columns) - 1:
            seen.append(self.connection.execute(text("SELECT version_num FROM alembic_version")).scalar())
            raise OSError(28, "No space left on device (injected)")
        seen.append((table_name, column.name))
        return real(self, table_name, column, **kw)

    # The implementation level: both op.add_column and SQLite's batch mode without a table rebuild end there.
    monkeypatch.setattr(DefaultImpl, "add_column", add_column)
    with pytest.raises(OSError, match="injected"):
        Store(store_url)
    monkeypatch.undo()
    assert seen[:-1] == columns[:-1]
    assert seen[-1] not in (None, base), "the failure came before any revision was applied"
    assert _state(store_url) == state_before
    assert _columns(store_url) == columns_before
    store = Store(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(_head(),)]
            assert conn.execute(text("SELECT name FROM models")).all() == [("old",)]
    finally:
        store.dispose()


def _columns(url: str) -> dict[str, list[str]]:
    engine = create_engine(url)
    try:
        insp = inspect(engine)
        present = STORE_TABLES & set(insp.get_table_names())
        return {name: [c["name"] for c in insp.get_columns(name)] for name in sorted(present)}
    finally:
        engine.dispose()


# --- a full disk -------------------------------------------------------------------------------------------------


def _mount_tmpfs(folder: Path, size: str, *options: str) -> bool:
    """Mount a tmpfs of ``size`` on ``folder``; False where this process may not mount (not root, no privilege)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    opts = ",".join([f"size={size}", *options])
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True).returncode == 0
    )


def _umount(folder: Path) -> None:
    gc.collect()  # engines of stores the CLI opened and did not dispose still hold files open
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``folder``'s file system."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as out:
        out.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


# Free bytes to leave on the full disk: from nothing at all to more than a new store needs (its write-ahead log and
# its -shm file on SQLite), so that the creation runs out of space at every stage.
SQLITE_FREE = [0, 4096, 8192, 16384, 24576, 32768, 40960, 49152, 57344, 65536, 81920, 98304, 131072, 262144]


def _check_full_disk_run(url: str, where: str, first, again) -> bool:
    """``first`` ran on a full disk, ``again`` after space returned: True when ``first`` failed (cleanly)."""
    if first.exit_code == 0:
        assert _state(url) == (STORE_TABLES, [_head()])
        return False
    line = one_line_error(first)
    assert where in line, line
    assert again.exit_code == 0, again.output
    _assert_usable_at_head(url)
    return True


def test_a_sqlite_store_created_on_a_full_disk_is_usable_once_space_returns(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "1m"):
        # Where mounting is not permitted, the same real write failures come from a file size limit.
        _sqlite_under_a_file_size_limit(tmp_path)
        return
    try:
        failed = 0
        for leave in SQLITE_FREE:
            for old in disk.iterdir():
                old.unlink()
            path = disk / "results.db"
            filler = _fill(disk, leave)
            first = CliRunner().invoke(main, ["db", "upgrade", "--db", str(path)])
            filler.unlink()
            gc.collect()
            again = CliRunner().invoke(main, ["db", "upgrade", "--db", str(path)])
            if _check_full_disk_run(f"sqlite:///{path}", str(path), first, again):
                failed += 1
                assert "no evaluations" in CliRunner().invoke(main, ["results", "--db", str(path)]).output
        # The sweep must have reached disks too full for a store, else it tested nothing.
        assert failed >= 3, failed
    finally:
        _umount(disk)


# The largest file the opener may write: a limit on the -shm and -wal files as a full disk would be.
FSIZE_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    # Ignored, SIGXFSZ would kill the process; the write then fails with EFBIG, as it would with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from bench.store import Store, StoreError
    try:
        Store(sys.argv[1])
    except StoreError as err:
        print(err)
        sys.exit(1)
    """
)


def _sqlite_under_a_file_size_limit(tmp_path: Path) -> None:
    failed = 0
    for limit in (4096, 16384, 36864, 49152):
        path = tmp_path / f"limit-{limit}" / "results.db"
        path.parent.mkdir()
        url = f"sqlite:///{path}"
        run = _run_python(FSIZE_LIMITED, url, str(limit))
        if run.returncode == 0:
            assert _state(url) == (STORE_TABLES, [_head()])
            continue
        failed += 1
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert str(path) in run.stdout and len(run.stdout.strip().splitlines()) == 1, run.stdout
        again = CliRunner().invoke(main, ["db", "upgrade", "--db", str(path)])
        assert again.exit_code == 0, again.output
        _assert_usable_at_head(url)
    assert failed >= 2, failed


def test_a_sqlite_store_created_under_a_file_size_limit_is_usable_after(tmp_path):
    # Runs everywhere (no mount needed): the writes really fail, as on a full disk.
    _sqlite_under_a_file_size_limit(tmp_path)


def _pg_admin(cluster):
    import psycopg

    return psycopg.connect(host=cluster.host, port=cluster.port, user="postgres", dbname="postgres", autocommit=True)


@contextmanager
def _pg_database_on(cluster, folder: Path):
    """A new database whose files (catalogs included) live in a tablespace on ``folder``; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with _pg_admin(cluster) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 TABLESPACE {folder.name}")
    try:
        # The first session writes the database's relation cache init file; afterwards sessions start on a full
        # disk and it is the store's creation that runs out of space.
        engine = create_engine(cluster.url(name))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        yield cluster.url(name)
    finally:
        with _pg_admin(cluster) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


PG_FREE = [0, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576]


def test_a_postgresql_store_created_on_a_full_disk_is_usable_once_space_returns(pg_cluster, monkeypatch):
    # The database lives in a tablespace on a small tmpfs, so its own files (not the server's log) fill up.
    space = pg_cluster.root / f"ts_{uuid.uuid4().hex[:12]}"
    space.mkdir()
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    ids = [f"uid={owner.pw_uid}", f"gid={owner.pw_gid}", "mode=0700"] if owner else []
    if not _mount_tmpfs(space, "32m", *ids):
        _pg_disk_full_injected(pg_cluster, monkeypatch)
        return
    try:
        with _pg_admin(pg_cluster) as admin:
            admin.execute(f"CREATE TABLESPACE {space.name} LOCATION '{space}'")
        failed = []
        try:
            for leave in PG_FREE:
                with _pg_database_on(pg_cluster, space) as url:
                    filler = _fill(space, leave)
                    first = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
                    filler.unlink()
                    again = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
                    gc.collect()
                    if not _check_full_disk_run(url, url.split("@")[1], first, again):
                        break
                    failed.append(first.output)
        finally:
            with _pg_admin(pg_cluster) as admin:
                admin.execute(f"DROP TABLESPACE IF EXISTS {space.name}")
        midway = [out for out in failed if "could not create or migrate" in out and "No space left on device" in out]
        assert len(midway) >= 3, failed
    finally:
        _umount(space)


def _pg_disk_full_injected(pg_cluster, monkeypatch) -> None:
    """Where no tmpfs can be mounted: the server itself reports disk_full (SQLSTATE 53100) partway."""
    name = pg_cluster.create_database()
    url = pg_cluster.url(name)
    real = Operations.create_table
    created = []

    def create_table(self, table_name, *columns, **kw):
        if len(created) == 2:
            self.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' "
                "USING ERRCODE = 'disk_full'; END $$"
            )
        created.append(table_name)
        return real(self, table_name, *columns, **kw)

    try:
        monkeypatch.setattr(Operations, "create_table", create_table)
        first = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
        monkeypatch.undo()
        assert created == ["models", "evaluations"]
        again = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
        assert _check_full_disk_run(url, url.split("@")[1], first, again)
    finally:
        gc.collect()
        pg_cluster.drop_database(name)


def test_the_injected_disk_full_fallback_works(pg_cluster, monkeypatch):
    # The fallback of the test above, run here too so that it is known to work where mounting is not permitted.
    _pg_disk_full_injected(pg_cluster, monkeypatch)


# --- stores an older apbench left half-created -------------------------------------------------------------------


def _half_created(url: str, *, version_table: bool, rows: int = 0) -> None:
    """What an older apbench left after a failed creation: two tables, maybe alembic_version, no revision."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn, tables=[Base.metadata.tables["models"], Base.metadata.tables["evaluations"]])
            if version_table:
                conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
            for i in range(rows):
                _insert_model(conn, f"m{i}", f"{i:064d}")
    finally:
        engine.dispose()


def _where(url: str) -> str:
    # The tests' PostgreSQL URLs hold no password, so messages show them whole.
    return url.removeprefix("sqlite:///") if url.startswith("sqlite") else url


@pytest.mark.parametrize("version_table", [True, False], ids=["empty-alembic_version", "no-alembic_version"])
def test_an_empty_half_created_store_is_repaired(store_url, version_table, caplog):
    _half_created(store_url, version_table=version_table)
    before = _state(store_url)
    assert before == ({"models", "evaluations"}, [] if version_table else None)
    # A command that only reads says what happened and how to repair it, and changes nothing.
    line = one_line_error(CliRunner().invoke(main, ["results", "--db", store_url]))
    assert f"the store {_where(store_url)} was left half-created" in line
    assert f"bench db upgrade --db {_where(store_url)} repairs it" in line
    assert _state(store_url) == before
    with caplog.at_level("WARNING", logger="bench.store.db"):
        result = CliRunner().invoke(main, ["db", "upgrade", "--db", store_url])
    assert result.exit_code == 0, result.output
    assert "dropped the empty tables and created it again" in caplog.text
    assert _where(store_url) in caplog.text
    _assert_usable_at_head(store_url)


def test_a_half_created_store_with_rows_is_refused_and_kept(store_url):
    _half_created(store_url, version_table=True, rows=2)
    for command_line in (["db", "upgrade"], ["results"]):
        line = one_line_error(CliRunner().invoke(main, [*command_line, "--db", store_url]))
        assert f"the store {_where(store_url)} holds tables evaluations, models with 2 rows but no schema revision" in (
            line
        )
        assert "move the file aside" in line if store_url.startswith("sqlite") else "use a new database" in line
    with pytest.raises(StoreError, match="no schema revision"):
        Store(store_url)
    assert _state(store_url) == ({"models", "evaluations"}, [])
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM models")).scalar() == 2
    finally:
        engine.dispose()
