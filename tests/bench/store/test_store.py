"""The results store: migrations to head, SQLite pragmas, constraints, transactions and URL resolution.

Tests taking ``store_url`` or ``any_store`` run on SQLite and on a real PostgreSQL server (tests/conftest.py).
"""

from __future__ import annotations

import sqlite3

import pytest
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

import bench.store.db as db_module
from bench.cli import main
from bench.provenance import utcnow
from bench.store import DEFAULT_DB_URL, Evaluation, Model, SampleResult, Store, resolve_db_url
from bench.store.db import alembic_config

TABLES = {"models", "evaluations", "sample_results", "alembic_version"}


def _head(url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def _current(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _raw_tables(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _count(store: Store, table: str) -> int:
    """Rows in ``table`` by plain SQL (not through the ORM's session)."""
    with store.engine.connect() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar()


def _sample(evaluation_id: int, sample_id: int) -> SampleResult:
    return SampleResult(
        evaluation_id=evaluation_id,
        sample_id=sample_id,
        label=3,
        clean_pred=3,
        clean_correct=True,
        logit_margin=1.5,
        aa_robust=True,
        aa_broken_by=None,
        adv_pred=3,
        fmn_label=3,
        fmn_success=True,
        fmn_distance=0.25,
        signed_eps=0.25,
        fmn_adv_pred=5,
        best_robust=True,
    )


def _evaluation(store: Store, n_samples: int = 3) -> int:
    """A model and one evaluation with ``n_samples`` per-sample rows; returns the evaluation id."""
    with store.session() as s:
        model = Model(name="m", checkpoint_sha256="a" * 64, arch="small_cnn", dataset="digits", created_at=utcnow())
        s.add(model)
        s.flush()
        ev = Evaluation(
            model_id=model.id,
            spec_hash="b" * 64,
            protocol_hash="c" * 64,
            spec={"eps": "0.2"},
            n_samples=n_samples,
            started_at=utcnow(),
        )
        s.add(ev)
        s.flush()
        s.add_all(_sample(ev.id, i) for i in range(n_samples))
        return ev.id


def test_fresh_store_is_at_alembic_head(store_url):
    store = Store(store_url)
    try:
        head = _head(store.url)
        assert head is not None
        assert _current(store) == head
        assert TABLES <= set(inspect(store.engine).get_table_names())
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(head,)]
    finally:
        store.dispose()


def test_reopening_a_store_is_a_no_op(store_url, monkeypatch):
    url = store_url
    first = Store(url)
    evaluation_id = _evaluation(first)
    first.dispose()

    def no_migration(*args, **kwargs):
        raise AssertionError("a store already at head must not run migrations again")

    monkeypatch.setattr(db_module.command, "upgrade", no_migration)
    second = Store(url)
    try:
        assert _current(second) == _head(url)
        with second.session() as s:
            assert s.scalar(select(func.count()).select_from(SampleResult)) == 3
            assert s.get(Evaluation, evaluation_id) is not None
    finally:
        second.dispose()


def test_migrate_false_leaves_an_empty_file_unmigrated(store_url):
    store = Store(store_url, migrate=False)
    try:
        assert _current(store) is None
        store.upgrade()
        assert _current(store) == _head(store.url)
    finally:
        store.dispose()


def test_sqlite_journal_mode_is_wal_and_busy_timeout_is_set(store, tmp_path):
    # journal_mode=WAL is persistent: a plain sqlite3 connection sees it in the file itself.
    with sqlite3.connect(tmp_path / "results.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    # busy_timeout and foreign_keys are per connection: every connection of the store's engine has them.
    for _ in range(2):
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == db_module.SQLITE_BUSY_TIMEOUT_MS
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5_000
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA journal_mode")).scalar().lower() == "wal"


def test_deleting_an_evaluation_cascades_to_its_samples(any_store):
    store = any_store
    evaluation_id = _evaluation(store, n_samples=4)
    # A plain SQL delete: the cascade must come from the database's foreign key, not from the ORM.
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM evaluations WHERE id = :id"), {"id": evaluation_id})
    assert _count(store, "evaluations") == 0
    assert _count(store, "sample_results") == 0
    assert _count(store, "models") == 1


def test_a_sample_row_needs_an_existing_evaluation(any_store):
    with pytest.raises(IntegrityError, match="(?i)foreign key"):
        with any_store.session() as s:
            s.add(_sample(evaluation_id=12345, sample_id=0))


def test_duplicate_sample_is_rejected_and_the_transaction_rolled_back(any_store):
    store = any_store
    evaluation_id = _evaluation(store, n_samples=2)
    with pytest.raises(IntegrityError, match="(?i)unique"):
        with store.session() as s:
            # Valid work in the same transaction, then a sample_id that is already stored.
            s.add(
                Model(name="other", checkpoint_sha256="d" * 64, arch="small_cnn", dataset="digits", created_at=utcnow())
            )
            s.add(_sample(evaluation_id, 5))
            s.flush()
            s.add(_sample(evaluation_id, 1))
            s.flush()
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM models")).all() == [("m",)]
        rows = conn.execute(text("SELECT sample_id FROM sample_results ORDER BY sample_id")).all()
        assert rows == [(0,), (1,)]
    # The store is still usable after the failed transaction.
    with store.session() as s:
        s.add(_sample(evaluation_id, 2))
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(SampleResult)) == 3


def test_the_same_sample_id_may_appear_in_two_evaluations(any_store):
    store = any_store
    evaluation_id = _evaluation(store, n_samples=1)
    with store.session() as s:
        ev = s.get(Evaluation, evaluation_id)
        other = Evaluation(
            model_id=ev.model_id,
            spec_hash="e" * 64,
            protocol_hash="c" * 64,
            spec={},
            n_samples=1,
            started_at=utcnow(),
        )
        s.add(other)
        s.flush()
        s.add(_sample(other.id, 0))
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(SampleResult).where(SampleResult.sample_id == 0)) == 2


def test_resolve_db_url_precedence(monkeypatch):
    monkeypatch.delenv("BENCH_DB", raising=False)
    assert DEFAULT_DB_URL == "sqlite:///results.db"
    assert resolve_db_url() == "sqlite:///results.db"
    assert resolve_db_url(None) == "sqlite:///results.db"
    monkeypatch.setenv("BENCH_DB", "sqlite:///from_env.db")
    assert resolve_db_url() == "sqlite:///from_env.db"
    assert resolve_db_url("sqlite:///from_option.db") == "sqlite:///from_option.db"
    # SQLAlchemy's bare postgresql:// would mean psycopg2; the store's driver is psycopg 3.
    assert resolve_db_url("postgresql://user@host/db") == "postgresql+psycopg://user@host/db"
    assert resolve_db_url("postgres://user:pw@host:5433/db") == "postgresql+psycopg://user:pw@host:5433/db"
    assert resolve_db_url("postgresql+psycopg://user@host/db") == "postgresql+psycopg://user@host/db"
    # An empty $BENCH_DB counts as unset.
    monkeypatch.setenv("BENCH_DB", "")
    assert resolve_db_url() == DEFAULT_DB_URL
    monkeypatch.setenv("BENCH_DB", "  ")
    assert resolve_db_url() == DEFAULT_DB_URL


def test_resolve_db_url_turns_a_bare_path_into_sqlite(tmp_path, monkeypatch):
    assert resolve_db_url("runs.db") == "sqlite:///runs.db"
    absolute = tmp_path / "sub" / "runs.db"
    url = resolve_db_url(str(absolute))
    assert url == f"sqlite:///{absolute}"
    monkeypatch.setenv("BENCH_DB", str(absolute))
    assert resolve_db_url() == url
    # The URL really points at that file.
    absolute.parent.mkdir()
    store = Store(str(absolute))
    store.dispose()
    assert TABLES <= _raw_tables(absolute)


@pytest.mark.parametrize(
    "bad",
    [
        "://nowhere",
        "not a url://x",
        # A bad port (make_url raises a bare ValueError) and an unknown dialect (create_engine would raise
        # NoSuchModuleError later) must get the same clear message.
        "postgresql://user@host:notaport/db",
        "nosuchdialect://host/db",
        # Databases SQLAlchemy knows but the store does not run on, and an explicitly empty --db.
        "mysql://user@host/db",
        "oracle://user@host/db",
        "",
    ],
)
def test_invalid_db_url_names_the_fix(bad, monkeypatch):
    with pytest.raises(ValueError, match="invalid database URL") as err:
        resolve_db_url(bad)
    message = str(err.value)
    assert "sqlite:///" in message and "--db" in message
    assert "\n" not in message
    if bad:
        monkeypatch.setenv("BENCH_DB", bad)
        with pytest.raises(ValueError, match="invalid database URL"):
            resolve_db_url()


def test_cli_db_upgrade_creates_the_tables(store_url):
    url = store_url
    result = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
    assert result.exit_code == 0, result.output
    assert url in result.output
    store = Store(url, migrate=False)
    try:
        assert TABLES <= set(inspect(store.engine).get_table_names())
        assert _current(store) == _head(url)
    finally:
        store.dispose()
    again = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
    assert again.exit_code == 0, again.output


def test_cli_db_upgrade_with_an_invalid_url_fails_cleanly():
    result = CliRunner().invoke(main, ["db", "upgrade", "--db", "://nowhere"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Error: invalid database URL" in result.output


def test_a_store_written_before_best_known_distances_upgrades_in_place_and_reads_its_rows(tmp_path):
    """A results file at schema 0001 (before FMN's warm start), rows written as that code wrote them: opening it
    migrates it in place, every old value reads back unchanged and the new columns read as None."""
    import json

    import numpy as np
    from alembic import command
    from alembic.autogenerate import compare_metadata

    from bench.analysis.curves import security_curve
    from bench.analysis.records import load_records
    from bench.spec import RunSpec
    from bench.store.schema import Base

    path = tmp_path / "old.db"
    cfg = alembic_config(f"sqlite:///{path}")
    command.upgrade(cfg, "0001")
    legacy = RunSpec.from_dict(
        dict(dataset="digits", n_samples=3, norm="Linf", eps="0.2", eps_value=0.2, version="plus", protocol="apbench-1")
    )
    assert "fmn_init" not in legacy.to_dict()
    now = "2026-01-02 03:04:05.000000"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO models (id, name, checkpoint_sha256, method, arch, dataset, structure, measured_sparsity, "
            "layer_sparsity, params, nonzero_params, flops, nonzero_flops, source, reported, taxonomy, provenance, "
            "created_at) VALUES (1, 'old', ?, 'dense', 'small_cnn', 'digits', 'dense', 0.0, '{}', 10, 10, 20, 20, "
            "'local', '{}', '{}', '{}', ?)",
            ("d" * 64, now),
        )
        conn.execute(
            "INSERT INTO evaluations (id, model_id, spec_hash, protocol_hash, spec, status, n_samples, clean_accuracy, "
            "aa_robust_accuracy, fmn_robust_accuracy, best_robust_accuracy, fmn_median_distance, n_fmn_beat_aa, flags, "
            "unreliable, attack_seconds, provenance, started_at, finished_at) VALUES (1, 1, ?, ?, ?, 'complete', 3, "
            "0.6667, 0.3333, 0.3333, 0.3333, 0.15, 0, '[]', 0, '{}', '{}', ?, ?)",
            (legacy.hash, legacy.protocol_hash, json.dumps(legacy.to_dict()), now, now),
        )
        conn.executemany(
            "INSERT INTO sample_results (evaluation_id, sample_id, label, clean_pred, clean_correct, logit_margin, "
            "aa_robust, aa_broken_by, adv_pred, fmn_label, fmn_success, fmn_distance, signed_eps, fmn_adv_pred, "
            "best_robust) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (0, 3, 3, 1, 1.5, 1, None, 3, 3, 1, 0.25, 0.25, 5, 1),
                (1, 4, 4, 1, 0.5, 0, "apgd-ce", 7, 4, 1, 0.15, 0.15, 7, 0),
                (2, 5, 6, 0, -0.5, 0, None, 6, 6, 1, 0.05, -0.05, 5, 0),
            ],
        )

    store = Store(f"sqlite:///{path}")
    try:
        assert _current(store) == _head(store.url)
        # The migrations give the schema the ORM declares, for the tables this revision touched.
        with store.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diffs if "sample_results" in repr(d) or "evaluations" in repr(d)] == []
        with store.session() as s:
            ev = s.get(Evaluation, 1)
            assert ev.spec_hash == legacy.hash and ev.spec == legacy.to_dict()
            assert RunSpec.from_dict(ev.spec) == legacy
            assert (ev.clean_accuracy, ev.fmn_median_distance, ev.n_fmn_beat_aa) == (0.6667, 0.15, 0)
            assert (ev.fmn_local_optimality, ev.best_median_distance, ev.n_fmn_above_best) == (None, None, None)
            rows = s.scalars(select(SampleResult).order_by(SampleResult.sample_id)).all()
            assert [(r.sample_id, r.fmn_distance, r.signed_eps, r.aa_broken_by) for r in rows] == [
                (0, 0.25, 0.25, None),
                (1, 0.15, 0.15, "apgd-ce"),
                (2, 0.05, -0.05, None),
            ]
            assert all(
                (r.aa_distance, r.fmn_warm_distance, r.best_distance, r.best_attack, r.signed_best_eps) == (None,) * 5
                for r in rows
            )
            records = load_records(s, 1)
        assert not records.has_best_known and np.isnan(records.best_distance).all()
        grid = np.array([0.0, 0.2, 0.3])
        assert security_curve(records, grid)[1].tolist() == security_curve(records, grid, "fmn")[1].tolist()
        assert records.to_csv().splitlines()[1].startswith("0,3,3,1,1.5,1,,3,3,1,0.25,0.25,5,1,")
    finally:
        store.dispose()
