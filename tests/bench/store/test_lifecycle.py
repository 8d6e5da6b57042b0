"""A stored model's lifecycle (bench/store/lifecycle.py, ``bench db list|rm|rename|rank``), on SQLite and PostgreSQL.

Removal takes exactly a model's rows, in one transaction; parents are refused unless their children go too; names
stay unique; the ranked flag round-trips, and a store written before it upgrades in place.
"""

from __future__ import annotations

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, func, inspect, select, text

from bench.provenance import utcnow
from bench.store import Evaluation, Model, SampleResult, Store, StoreError
from bench.store.db import alembic_config
from bench.store.lifecycle import (
    HasChildrenError,
    NameTakenError,
    UnknownModelError,
    describe_models,
    find_model,
    list_models,
    plan_removal,
    remove_models,
    rename_model,
    set_ranked,
)
from tests.cli import invoke

TABLES = ("models", "evaluations", "sample_results")


def _model(s, name: str, *, parent: Model | None = None, path: str | None = None) -> Model:
    row = Model(
        name=name,
        checkpoint_sha256=name.ljust(64, "0")[:64],
        checkpoint_path=path,
        method="dense" if parent is None else "hydra",
        structure="dense" if parent is None else "US",
        arch="small_cnn",
        dataset="digits",
        parent_id=parent.id if parent is not None else None,
        created_at=utcnow(),
    )
    s.add(row)
    s.flush()
    return row


def _evaluation(s, model: Model, n_samples: int, *, tag: str, status: str = "complete") -> Evaluation:
    ev = Evaluation(
        model_id=model.id,
        spec_hash=tag.ljust(64, "0")[:64],
        protocol_hash="p" * 64,
        spec={"eps": "0.2"},
        status=status,
        n_samples=n_samples,
        started_at=utcnow(),
    )
    s.add(ev)
    s.flush()
    for i in range(n_samples):
        s.add(
            SampleResult(
                evaluation_id=ev.id,
                sample_id=i,
                label=1,
                clean_pred=1,
                clean_correct=True,
                logit_margin=0.5,
                aa_robust=True,
                adv_pred=1,
                fmn_label=1,
                fmn_success=True,
                fmn_distance=0.1,
                signed_eps=0.1,
                fmn_adv_pred=2,
                best_robust=True,
            )
        )
    s.flush()
    return ev


def _populate(store: Store) -> dict[str, int]:
    """dense (2 evaluations: 3 + 2 samples) <- pruned (1 evaluation, 4 samples) <- repruned (none); other (1
    evaluation, 5 samples, one unfinished with 1 sample). Returns the model ids by name."""
    with store.session() as s:
        dense = _model(s, "dense", path="/ckpt/dense.pt")
        pruned = _model(s, "pruned", parent=dense, path="/ckpt/pruned.pt")
        repruned = _model(s, "repruned", parent=pruned)
        other = _model(s, "other", path="/ckpt/other.pt")
        _evaluation(s, dense, 3, tag="a")
        _evaluation(s, dense, 2, tag="b")
        _evaluation(s, pruned, 4, tag="c")
        _evaluation(s, other, 5, tag="d")
        _evaluation(s, other, 1, tag="e", status="running")
        return {m.name: m.id for m in (dense, pruned, repruned, other)}


def _rows(store: Store) -> dict[str, set[tuple]]:
    """Every row of the three tables, by plain SQL: (id, owner id) pairs."""
    queries = {
        "models": "SELECT id, name FROM models",
        "evaluations": "SELECT id, model_id FROM evaluations",
        "sample_results": "SELECT id, evaluation_id FROM sample_results",
    }
    with store.engine.connect() as conn:
        return {table: set(map(tuple, conn.execute(text(sql)).all())) for table, sql in queries.items()}


def _owned(rows: dict[str, set[tuple]], model_ids: set[int]) -> dict[str, set[tuple]]:
    """The rows that belong to ``model_ids``: the models, their evaluations, those evaluations' samples."""
    evaluations = {r for r in rows["evaluations"] if r[1] in model_ids}
    evaluation_ids = {r[0] for r in evaluations}
    return {
        "models": {r for r in rows["models"] if r[0] in model_ids},
        "evaluations": evaluations,
        "sample_results": {r for r in rows["sample_results"] if r[1] in evaluation_ids},
    }


# ------------------------------------------------------------------------------------------------ removal


def test_rm_removes_exactly_the_models_rows(any_store):
    ids = _populate(any_store)
    before = _rows(any_store)
    owned = _owned(before, {ids["other"]})
    assert {t: len(r) for t, r in owned.items()} == {"models": 1, "evaluations": 2, "sample_results": 6}

    removed = remove_models(any_store, ["other"])

    after = _rows(any_store)
    for table in TABLES:
        assert after[table] == before[table] - owned[table], table
    assert [m.name for m in removed.models] == ["other"]
    assert (removed.evaluations, removed.samples) == (2, 6)
    (m,) = removed.models
    assert (m.unfinished, m.checkpoint_path) == (1, "/ckpt/other.pt")


def test_rm_refuses_a_parent_and_names_its_children(any_store):
    ids = _populate(any_store)
    before = _rows(any_store)
    with pytest.raises(HasChildrenError) as err:
        remove_models(any_store, ["dense"])
    message = str(err.value)
    assert "\n" not in message
    assert f"model #{ids['dense']} 'dense' is the parent of #{ids['pruned']} 'pruned'" in message
    assert "--with-children" in message and "nothing was removed" in message
    assert _rows(any_store) == before
    with pytest.raises(HasChildrenError, match="plan|parent"):
        plan_removal(any_store, ["pruned"])


def test_rm_of_a_parent_with_its_children_named_too_needs_no_flag(any_store):
    ids = _populate(any_store)
    before = _rows(any_store)
    family = {ids["dense"], ids["pruned"], ids["repruned"]}
    removed = remove_models(any_store, ["repruned", str(ids["pruned"]), f"#{ids['dense']}"])
    assert set(removed.ids) == family
    after = _rows(any_store)
    owned = _owned(before, family)
    for table in TABLES:
        assert after[table] == before[table] - owned[table], table


def test_rm_with_children_removes_every_descendant(any_store):
    ids = _populate(any_store)
    before = _rows(any_store)
    removed = remove_models(any_store, ["dense"], with_children=True)
    assert removed.ids == (ids["dense"], ids["pruned"], ids["repruned"])  # named first, then by generation
    assert (removed.evaluations, removed.samples) == (3, 9)
    owned = _owned(before, set(removed.ids))
    after = _rows(any_store)
    for table in TABLES:
        assert after[table] == before[table] - owned[table], table
    assert {name for _, name in after["models"]} == {"other"}


def test_rm_is_atomic_when_a_statement_fails_midway(any_store):
    """The samples' and evaluations' DELETEs have run when the models' DELETE fails: all of it is rolled back."""
    _populate(any_store)
    before = _rows(any_store)
    seen = []

    def fail_on_models(conn, cursor, statement, params, context, executemany):
        seen.append(statement.split()[:3])
        if statement.lstrip().upper().startswith("DELETE FROM MODELS"):
            raise RuntimeError("injected failure")

    event.listen(any_store.engine, "before_cursor_execute", fail_on_models)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            remove_models(any_store, ["dense"], with_children=True)
    finally:
        event.remove(any_store.engine, "before_cursor_execute", fail_on_models)
    deletes = [words[2].lower() for words in seen if words[0].upper() == "DELETE"]
    assert deletes == ["sample_results", "evaluation_chunks", "evaluations", "models"]
    assert _rows(any_store) == before


def test_rm_refuses_when_the_store_changed_after_the_plan_was_confirmed(any_store):
    ids = _populate(any_store)
    plan = plan_removal(any_store, ["other"])
    with any_store.session() as s:
        _evaluation(s, s.get(Model, ids["other"]), 2, tag="late")
    before = _rows(any_store)
    with pytest.raises(ValueError, match="store changed"):
        remove_models(any_store, ["other"], expected=plan)
    assert _rows(any_store) == before
    assert remove_models(any_store, ["other"], expected=plan_removal(any_store, ["other"])).samples == 8


def test_unknown_models_are_refused_with_a_close_name(any_store):
    _populate(any_store)
    before = _rows(any_store)
    with pytest.raises(UnknownModelError, match=r"no model 'pruend' .*did you mean 'pruned'\?"):
        remove_models(any_store, ["other", "pruend"])
    with pytest.raises(UnknownModelError, match="no model '9999'"):
        remove_models(any_store, ["9999"])
    assert _rows(any_store) == before


def test_a_name_wins_over_an_id(any_store):
    ids = _populate(any_store)
    with any_store.session() as s:
        numeric = Model(
            name=str(ids["dense"]), checkpoint_sha256="9" * 64, arch="small_cnn", dataset="digits", created_at=utcnow()
        )
        s.add(numeric)
        s.flush()
        assert find_model(s, str(ids["dense"])).id == numeric.id
        assert find_model(s, f"#{ids['dense']}").id == ids["dense"]


# ------------------------------------------------------------------------------------------- rename, rank


def test_rename_changes_only_the_name(any_store):
    ids = _populate(any_store)
    before, new = rename_model(any_store, "pruned", "pruned-hydra-90")
    assert (before.name, before.id, new) == ("pruned", ids["pruned"], "pruned-hydra-90")
    with any_store.session() as s:
        row = s.get(Model, ids["pruned"])
        assert (row.name, row.parent_id, len(row.evaluations)) == ("pruned-hydra-90", ids["dense"], 1)
    rename_model(any_store, str(ids["pruned"]), "pruned")  # by id, back
    assert [m.name for m in list_models(any_store)] == ["dense", "pruned", "repruned", "other"]


def test_rename_refuses_a_taken_name_in_one_line(any_store):
    ids = _populate(any_store)
    before = _rows(any_store)
    with pytest.raises(NameTakenError) as err:
        rename_model(any_store, "pruned", "other")
    assert str(err.value) == (
        f"the name 'other' is already model #{ids['other']} (dense, small_cnn, digits); choose another name, "
        "or rename or remove that model first"
    )
    assert _rows(any_store) == before


@pytest.mark.parametrize(
    ("name", "says"),
    [("", "cannot be empty"), (" x", "spaces"), ("a\x1bb", "control characters"), ("42", "model id"),
     ("#7", "model id"), ("x" * 201, "at most 200")],
)  # fmt: skip
def test_rename_refuses_names_that_cannot_name_a_model(any_store, name, says):
    _populate(any_store)
    with pytest.raises(ValueError, match=says):
        rename_model(any_store, "pruned", name)
    assert describe_models(any_store, ["pruned"])[0].name == "pruned"


def test_the_ranked_flag_defaults_to_true_and_round_trips(any_store):
    ids = _populate(any_store)
    assert all(m.ranked for m in list_models(any_store))
    before = set_ranked(any_store, ["pruned", "other", "pruned"], False)
    assert [(m.name, m.ranked) for m in before] == [("pruned", True), ("other", True)]
    with any_store.engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT name, ranked FROM models")).all())
    assert {name: bool(v) for name, v in stored.items()} == {
        "dense": True,
        "pruned": False,
        "repruned": True,
        "other": False,
    }
    with any_store.session() as s:
        assert s.get(Model, ids["pruned"]).ranked is False
    set_ranked(any_store, ["pruned"], True)
    assert [(m.name, m.ranked) for m in describe_models(any_store, ["pruned", "other"])] == [
        ("pruned", True),
        ("other", False),
    ]


def test_a_row_inserted_without_ranked_is_ranked(any_store):
    # The server default, not only the ORM's: rows written by other code (or an older apbench) are ranked.
    with any_store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (name, checkpoint_sha256, normalization, method, arch, dataset, structure, "
                "measured_sparsity, layer_sparsity, params, nonzero_params, flops, nonzero_flops, source, reported, "
                "taxonomy, provenance, created_at) VALUES ('raw', :sha, 'dataset', 'dense', 'small_cnn', 'digits', "
                "'dense', 0.0, '{}', 1, 1, 1, 1, 'local', '{}', '{}', '{}', :now)"
            ),
            {"sha": "e" * 64, "now": utcnow()},
        )
    assert [(m.name, m.ranked) for m in list_models(any_store)] == [("raw", True)]


# ------------------------------------------------------------------------------------------------ migration


def _at_revision(url: str, revision: str) -> None:
    """A store created by the migrations up to ``revision`` (the schema an older apbench wrote)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def test_a_store_at_0003_upgrades_in_place_with_every_model_ranked(store_url):
    assert ScriptDirectory.from_config(alembic_config(store_url)).get_revision("0004_model_ranked").down_revision == (
        "0003_model_identity"
    )
    _at_revision(store_url, "0003_model_identity")
    engine = create_engine(store_url)
    try:
        assert "ranked" not in {c["name"] for c in inspect(engine).get_columns("models")}
        with engine.begin() as conn:
            for i, name in enumerate(("old-dense", "old-pruned"), 1):
                conn.execute(
                    text(
                        "INSERT INTO models (id, name, checkpoint_sha256, normalization, method, arch, dataset, "
                        "structure, measured_sparsity, layer_sparsity, params, nonzero_params, flops, nonzero_flops, "
                        "parent_id, source, reported, taxonomy, provenance, created_at) VALUES (:id, :name, :sha, "
                        "'dataset', 'dense', 'small_cnn', 'digits', 'dense', 0.0, '{}', 1, 1, 1, 1, :parent, "
                        "'local', '{}', '{}', '{}', :now)"
                    ),
                    {"id": i, "name": name, "sha": str(i) * 64, "parent": 1 if i == 2 else None, "now": utcnow()},
                )
            conn.execute(
                text(
                    "INSERT INTO evaluations (model_id, spec_hash, protocol_hash, spec, status, n_samples, flags, "
                    "unreliable, attack_seconds, provenance, started_at) VALUES (2, :h, :h, '{}', 'complete', 0, "
                    "'[]', false, '{}', '{}', :now)"
                ),
                {"h": "f" * 64, "now": utcnow()},
            )
    finally:
        engine.dispose()

    store = Store(store_url)  # migrates to head on the store's own connection (foreign keys on)
    try:
        with store.engine.connect() as conn:
            head = ScriptDirectory.from_config(alembic_config(store_url)).get_current_head()
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
            assert conn.execute(select(func.count()).select_from(Evaluation)).scalar() == 1  # nothing cascaded
        column = next(c for c in inspect(store.engine).get_columns("models") if c["name"] == "ranked")
        assert column["nullable"] is False
        assert [(m.name, m.ranked, m.evaluations) for m in list_models(store)] == [
            ("old-dense", True, 0),
            ("old-pruned", True, 1),
        ]
        set_ranked(store, ["old-pruned"], False)
        assert [m.ranked for m in list_models(store)] == [True, False]
    finally:
        store.dispose()


def test_the_migration_downgrades_to_0003(store_url):
    Store(store_url).dispose()
    command.downgrade(alembic_config(store_url), "0003_model_identity")
    engine = create_engine(store_url)
    try:
        assert "ranked" not in {c["name"] for c in inspect(engine).get_columns("models")}
    finally:
        engine.dispose()
    store = Store(store_url)  # and up again
    try:
        assert list_models(store) == []
        assert "ranked" in {c["name"] for c in inspect(store.engine).get_columns("models")}
    finally:
        store.dispose()


# ------------------------------------------------------------------------------------------- bench db ...


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    return errors[0]


@pytest.fixture
def populated(store_url):
    store = Store(store_url)
    try:
        ids = _populate(store)
        yield store_url, store, ids
    finally:
        store.dispose()


def test_cli_rm_removes_with_yes_and_says_where_the_checkpoint_stays(populated):
    url, store, ids = populated
    before = _rows(store)
    result = invoke("db", "rm", "other", "--yes", "--db", url)
    assert result.exit_code == 0, result.output
    assert (
        f"removed model #{ids['other']} 'other' (dense, small_cnn, digits): 2 evaluations (1 unfinished), "
        "6 per-sample rows; its checkpoint stays on disk at /ckpt/other.pt"
    ) in result.output
    assert "removed 1 model, 2 evaluations and 6 per-sample rows from" in result.output
    after = _rows(store)
    owned = _owned(before, {ids["other"]})
    assert all(after[t] == before[t] - owned[t] for t in TABLES)


def test_cli_rm_asks_first_and_a_no_removes_nothing(populated):
    url, store, ids = populated
    before = _rows(store)
    result = invoke("db", "rm", "dense", "--with-children", "--db", url, input="n\n")
    assert result.exit_code == 1 and result.output.endswith(
        "not confirmed; nothing was removed (--yes removes without asking)\n"
    )
    assert _rows(store) == before
    closed = invoke("db", "rm", "dense", "--with-children", "--db", url, input="")  # no terminal, no answer
    assert closed.exit_code == 1 and "nothing was removed" in closed.output and "Error" not in closed.output
    assert "about to remove from" in result.output
    assert f"model #{ids['repruned']} 'repruned' (hydra, small_cnn, digits, derived from #{ids['pruned']})" in (
        result.output
    )
    assert "remove 3 models, 3 evaluations and 9 per-sample rows? [y/N]" in result.output
    assert _rows(store) == before
    result = invoke("db", "rm", "dense", "--with-children", "--db", url, input="y\n")
    assert result.exit_code == 0, result.output
    assert {name for _, name in _rows(store)["models"]} == {"other"}


def test_cli_rm_refuses_a_parent_in_one_line(populated):
    url, store, ids = populated
    before = _rows(store)
    line = _error_line(invoke("db", "rm", "pruned", "--yes", "--db", url))
    assert f"model #{ids['pruned']} 'pruned' is the parent of #{ids['repruned']} 'repruned'" in line
    assert "--with-children" in line
    assert _rows(store) == before


def test_cli_rename_and_a_taken_name(populated):
    url, store, ids = populated
    result = invoke("db", "rename", "pruned", "hydra-90", "--db", url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"renamed model #{ids['pruned']} 'pruned' to 'hydra-90'"
    line = _error_line(invoke("db", "rename", "hydra-90", "dense", "--db", url))
    assert line == (
        f"Error: the name 'dense' is already model #{ids['dense']} (dense, small_cnn, digits); choose another name, "
        "or rename or remove that model first"
    )
    assert describe_models(store, [ids["pruned"]])[0].name == "hydra-90"


def test_cli_rank_off_on_and_show(populated):
    url, store, ids = populated
    result = invoke("db", "rank", "other", "--off", "--db", url)
    assert result.exit_code == 0, result.output
    assert f"model #{ids['other']} 'other' is now unranked" in result.output
    assert describe_models(store, ["other"])[0].ranked is False
    shown = invoke("db", "rank", "other", "dense", "--db", url)
    assert shown.output.splitlines() == [
        f"model #{ids['other']} 'other' is not ranked (a sanity run)",
        f"model #{ids['dense']} 'dense' is ranked",
    ]
    listed = invoke("db", "list", "--db", url)
    assert listed.exit_code == 0, listed.output
    other = next(line for line in listed.output.splitlines() if " other " in line)
    assert "no (sanity run)" in other
    assert invoke("db", "rank", "other", "--on", "--db", url).exit_code == 0
    assert describe_models(store, ["other"])[0].ranked is True


def test_cli_db_commands_never_create_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.db"
    for args in (["rm", "x", "--yes"], ["rename", "x", "y"], ["rank", "x", "--off"], ["rank", "x"], ["list"]):
        line = _error_line(invoke("db", *args, "--db", str(missing)))
        assert f"no store at {missing}" in line
    assert not missing.exists() and list(tmp_path.iterdir()) == []


def test_a_store_error_in_a_change_is_one_line(populated, monkeypatch):
    url, store, _ = populated
    from sqlalchemy.exc import OperationalError

    def broken(*args, **kwargs):
        raise OperationalError("DELETE", {}, Exception("disk I/O error\nsecond line"))

    monkeypatch.setattr("sqlalchemy.orm.Session.execute", broken)
    with pytest.raises(StoreError, match=r"could not change the store .*: disk I/O error; nothing was changed"):
        remove_models(store, ["other"])
