"""Opening stores on SQLite and PostgreSQL: read-only commands, unreadable and foreign stores, missing drivers.

Every case that stops a store from opening must end in one ``Error:`` line naming the problem and the fix (never
a traceback), and a command that only reads must never create, migrate or write a store.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from bench.provenance import utcnow
from bench.store import Model, Store, StoreError
from bench.store.db import alembic_config
from tests.analysis_store import add_evaluation, add_model
from tests.cli import invoke, one_line_error
from tests.paths import REPO_ROOT

NO_STORE = "create one with bench db upgrade --db"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluation(store: Store, n_samples: int) -> int:
    """A dense model "m" with one complete evaluation of ``n_samples`` stored samples."""
    model_id = add_model(store, "m")
    return add_evaluation(store, model_id, clean_correct=[i % 3 != 0 for i in range(n_samples)])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


READ_COMMANDS = {
    "results": ["results"],
    "report": ["report", "1"],
    "analyze drops": ["analyze", "drops"],
    "analyze curve": ["analyze", "curve", "eval:1"],
    "leaderboard build": ["leaderboard", "build", "--out", "site"],
}


@pytest.mark.parametrize("command", READ_COMMANDS.values(), ids=READ_COMMANDS.keys())
def test_read_only_commands_never_create_a_store(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke(*command, "--db", "nonsense"))
    assert line == f"Error: no store at nonsense; {NO_STORE} nonsense or run bench evaluate"
    # Nor from $BENCH_DB, nor from the default; an empty $BENCH_DB counts as unset.
    monkeypatch.setenv("BENCH_DB", "")
    line = one_line_error(invoke(*command))
    assert line == f"Error: no store at results.db; {NO_STORE} results.db or run bench evaluate"
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_command_on_an_empty_database_says_no_store(store_url):
    # An existing but empty database (a new PostgreSQL database, a zero-byte file) is no store either.
    if store_url.startswith("sqlite"):
        Path(store_url.removeprefix("sqlite:///")).touch()
    line = one_line_error(invoke("results", "--db", store_url))
    assert "no store at" in line and NO_STORE in line
    bare = Store(store_url, migrate=False)
    try:
        with bare.engine.connect() as conn:
            tables = conn.dialect.get_table_names(conn)
        assert tables == []
    finally:
        bare.dispose()


def test_store_cases_on_sqlite_end_in_one_line(tmp_path):
    missing_folder = tmp_path / "no" / "such" / "results.db"
    line = one_line_error(invoke("results", "--db", str(missing_folder)))
    assert f"no store at {missing_folder}" in line
    line = one_line_error(invoke("db", "upgrade", "--db", str(missing_folder)))
    assert f"folder {missing_folder.parent} does not exist" in line
    assert not (tmp_path / "no").exists()

    folder = tmp_path / "a_folder"
    folder.mkdir()
    for command in (["results"], ["db", "upgrade"]):
        line = one_line_error(invoke(*command, "--db", str(folder)))
        assert f"{folder} is a folder, not a store; give a file such as {folder / 'results.db'}" in line
    assert list(folder.iterdir()) == []

    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database\n" * 100)
    before = _sha256(not_sqlite)
    for command in (["results"], ["db", "upgrade"], ["analyze", "drops"]):
        line = one_line_error(invoke(*command, "--db", str(not_sqlite)))
        assert f"{not_sqlite} is not a SQLite database" in line, command
    assert _sha256(not_sqlite) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "notes.txt"]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("mysql://user@localhost/bench", "the store runs on SQLite"),
        ("sqlite+nosuchdriver:///x.db", "invalid database URL"),
        ("postgresql://user@host:notaport/db", "invalid database URL"),
    ],
)
def test_unsupported_urls_end_in_one_line(url, expected):
    for command in (["results"], ["db", "upgrade"]):
        assert expected in one_line_error(invoke(*command, "--db", url))


def test_a_stopped_server_ends_in_one_line_and_hides_the_password():
    url = f"postgresql://bench:s3cret@127.0.0.1:{_closed_port()}/results"
    for command in (["results"], ["db", "upgrade"], ["leaderboard", "build", "--out", "site"]):
        line = one_line_error(invoke(*command, "--db", url))
        assert line.startswith("Error: cannot connect to the store postgresql+psycopg://bench:***@127.0.0.1:")
        assert "check that the server runs" in line
        assert "s3cret" not in line


def test_a_running_server_s_password_is_never_printed(pg_url, digits_cnn_checkpoint):
    # The test server trusts local connections, so a URL with a password connects, and every line that names the
    # store (bench db upgrade, an evaluation's summary, the API's result and errors) must mask the password.
    import apbench

    url = pg_url.replace("postgres@", "postgres:s3cret@", 1)
    assert "s3cret" in url
    upgraded = invoke("db", "upgrade", "--db", url)
    assert upgraded.exit_code == 0, upgraded.output
    args = ["--arch", "small_cnn", "--dataset", "digits", "--n-samples", "4", "--aa-version", "standard"]
    evaluated = invoke("evaluate", "--checkpoint", str(digits_cnn_checkpoint), *args, "--fmn-steps", "3", "--db", url)
    assert evaluated.exit_code == 0, evaluated.output
    assert "stored in                postgresql+psycopg://postgres:***@" in evaluated.output
    with pytest.raises(
        ValueError, match=r"no evaluation of a model 'nomatch' in postgresql\+psycopg://postgres:\*\*\*@"
    ):
        apbench.load_results(url, model="nomatch")
    for output in (upgraded.output, evaluated.output):
        assert "s3cret" not in output


def test_a_password_is_masked_wherever_the_url_carries_it():
    import pandas as pd

    from bench.api import EvaluationResult
    from bench.store.db import shown_url, url_password

    for url in ("postgresql://u:s3cret@h/d", "postgresql://u@h/d?password=s3cret&sslmode=require"):
        assert url_password(url) == "s3cret"
        assert "s3cret" not in shown_url(url) and "***" in shown_url(url)
        # A notebook shows a result by its repr: the URL is left out of it.
        result = EvaluationResult(summary="S", samples=pd.DataFrame(), spec="R", db=url)
        assert "s3cret" not in repr(result)
    assert url_password("postgresql://u@h/d") is None
    assert shown_url("postgresql://u@h/d?sslmode=require") == "postgresql://u@h/d?sslmode=require"


def test_a_missing_postgres_driver_names_the_extra(monkeypatch):
    # A None entry in sys.modules makes `import psycopg` fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StoreError, match=r"pip install 'apbench\[postgres\]'"):
        Store("postgresql://user@127.0.0.1/db")
    line = one_line_error(invoke("db", "upgrade", "--db", "postgresql://user@127.0.0.1/db"))
    assert line.startswith("Error: the PostgreSQL driver psycopg is not installed")
    assert "pip install 'apbench[postgres]'" in line


def test_a_missing_database_on_a_running_server_ends_in_one_line(pg_cluster):
    url = pg_cluster.url("no_such_database")
    line = one_line_error(invoke("db", "upgrade", "--db", url))
    assert "cannot connect to the store" in line and 'database "no_such_database" does not exist' in line


def _set_revision(url: str, revision: str) -> None:
    store = Store(url, migrate=False)
    try:
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
    finally:
        store.dispose()


def test_a_store_from_a_newer_apbench_is_refused(store_url):
    Store(store_url).dispose()
    _set_revision(store_url, "9999_from_the_future")
    for command in (["results"], ["db", "upgrade"], ["analyze", "drops"]):
        line = one_line_error(invoke(*command, "--db", store_url))
        assert "is at schema revision 9999_from_the_future, which this apbench does not know" in line
        assert "upgrade apbench" in line
    with pytest.raises(StoreError, match="does not know"):
        Store(store_url, read_only=True)


def test_a_read_only_command_does_not_migrate_an_older_store(store_url):
    script = ScriptDirectory.from_config(alembic_config(store_url))
    head, base = script.get_current_head(), script.get_base()
    assert head != base, "the migration chain has a single revision; this test needs two"
    Store(store_url).dispose()
    _set_revision(store_url, base)
    line = one_line_error(invoke("results", "--db", store_url))
    assert f"is at schema revision {base}, older than this apbench's {head}" in line
    assert f"upgrade it with bench db upgrade --db {store_url}" in line
    store = Store(store_url, migrate=False)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == base
    finally:
        store.dispose()


def test_read_commands_work_on_a_store_opened_read_only(store_url, tmp_path):
    # On PostgreSQL their sessions are read-only transactions: any write these commands made would fail here.
    store = Store(store_url)
    _evaluation(store, n_samples=6)
    store.dispose()
    for command in (
        ["results", "--format", "json"],
        ["report", "m"],
        ["analyze", "drops"],
        ["analyze", "curve", "m"],
        ["leaderboard", "build", "--out", str(tmp_path / "site"), "--workers", "1"],
    ):
        result = invoke(*command, "--db", store_url)
        assert result.exit_code == 0, (command, result.output)
    assert json.loads(invoke("results", "--format", "json", "--db", store_url).output)[0]["n"] == 6
    assert (tmp_path / "site" / "index.html").is_file()


def test_a_read_only_store_refuses_writes(store_url):
    Store(store_url).dispose()
    store = Store(store_url, read_only=True)
    try:
        assert store.read_only
        with pytest.raises(DBAPIError, match="(?i)read-?only"):
            with store.session() as s:
                s.add(Model(name="x", checkpoint_sha256="f" * 64, arch="a", dataset="d", created_at=utcnow()))
        with pytest.raises(StoreError, match="read-only"):
            store.upgrade()
    finally:
        store.dispose()


def test_big_integers_and_json_round_trip(any_store):
    # flops of a large network overflow 32-bit integers; JSON keeps nesting, floats and non-ASCII text.
    layer = {"features.0.weight": 0.125, "naïve/ñ": [1, 2.5, None, {"k": "v"}]}
    with any_store.session() as s:
        s.add(
            Model(
                name="big",
                checkpoint_sha256="9" * 64,
                arch="resnet18",
                dataset="cifar10",
                params=11_173_962,
                flops=2**40 + 7,
                nonzero_flops=2**33,
                layer_sparsity=layer,
                created_at=utcnow(),
            )
        )
    with any_store.session() as s:
        row = s.scalars(select(Model).where(Model.name == "big")).one()
        assert (row.flops, row.nonzero_flops) == (2**40 + 7, 2**33)
        assert row.layer_sparsity == layer


# --- a store this process cannot write -------------------------------------------------------------------------


def _read_only_results(store_path: Path) -> dict:
    """``bench results --format json`` on ``store_path`` by a process that can read but not write it or its folder.

    The file and folder lose their write bits; as root (whom permission bits do not stop) the command also runs
    without any capability, through util-linux's setpriv, so that the bits apply to it as to any user.
    """
    args = [sys.executable, "-m", "bench.cli", "results", "--format", "json", "--db", str(store_path)]
    if os.geteuid() == 0:
        args = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store_path.chmod(0o444)
    store_path.parent.chmod(0o555)
    try:
        run = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        store_path.parent.chmod(0o755)
        store_path.chmod(0o644)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@pytest.fixture
def shared_folder(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    return folder


def test_a_read_only_store_can_be_read_and_is_left_untouched(shared_folder):
    path = shared_folder / "results.db"
    store = Store(str(path))
    _evaluation(store, n_samples=3)
    store.dispose()
    assert sorted(p.name for p in shared_folder.iterdir()) == ["results.db"]  # WAL checkpointed on close
    before = _sha256(path)
    records = _read_only_results(path)
    assert [(r["model"], r["n"]) for r in records] == [("m", 3)]
    assert _sha256(path) == before
    assert sorted(p.name for p in shared_folder.iterdir()) == ["results.db"]


def test_a_read_only_reader_sees_rows_still_in_the_write_ahead_log(shared_folder):
    # A writer keeps the store open and its last commit sits in results.db-wal, not yet in the main file: a
    # reader that treated the file as immutable would miss it.
    path = shared_folder / "results.db"
    Store(str(path)).dispose()
    writer = sqlite3.connect(path)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("SELECT 1 FROM models").fetchall()
        for name in (f"{path}-wal", f"{path}-shm"):
            os.chmod(name, 0o444)
        store = Store(str(path))
        _evaluation(store, n_samples=2)
        store.dispose()
        # The main file alone (what an immutable open would read) does not hold the evaluation yet.
        with sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True) as main_file:
            assert main_file.execute("SELECT COUNT(*) FROM evaluations").fetchone() == (0,)
        records = _read_only_results(path)
        assert [(r["model"], r["n"]) for r in records] == [("m", 2)]
    finally:
        writer.close()


def test_read_only_open_of_a_writable_store_leaves_its_bytes_alone(tmp_path):
    path = tmp_path / "results.db"
    store = Store(str(path))
    _evaluation(store, n_samples=2)
    store.dispose()
    before = _sha256(path)
    result = invoke("results", "--db", str(path), "--format", "json")
    assert result.exit_code == 0, result.output
    assert [r["n"] for r in json.loads(result.output)] == [2]
    assert _sha256(path) == before
