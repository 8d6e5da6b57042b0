"""The per-sample record is defined once (bench.records.SampleRecord): the store's table, the CSV's columns, the
arrays analyses read and the rows the evaluator inserts all follow it, and the schema the migrations build is
the one the record gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Boolean, Float, Integer, String, inspect

from bench.analysis.records import CSV_COLUMNS, EvaluationRecords, load_records
from bench.evaluate import attack_chunk, evaluate
from bench.provenance import utcnow
from bench.records import RECORD_COLUMNS, RECORD_FIELDS, SampleRecord, record_fields
from bench.spec import RunSpec
from bench.store import Base, Model, SampleResult

SPEC = RunSpec(
    dataset="digits",
    n_samples=8,
    norm="Linf",
    eps="0.1",
    eps_value=0.1,
    version="standard",
    fmn_steps=10,
    batch_size=4,
    seed=0,
)


def test_the_record_lists_each_field_once_with_its_type_and_meaning():
    assert RECORD_COLUMNS == tuple(f.name for f in dataclasses.fields(SampleRecord))
    assert len(set(RECORD_COLUMNS)) == len(RECORD_COLUMNS) and RECORD_COLUMNS[0] == "sample_id"
    by_name = {f.name: f for f in RECORD_FIELDS}
    stage = by_name["aa_broken_by"]
    assert (stage.type, stage.nullable, stage.length) == (str, True, 16)
    assert (by_name["logit_margin"].type, by_name["logit_margin"].nullable) == (float, False)
    assert (by_name["fmn_distance"].type, by_name["fmn_distance"].nullable) == (float, True)
    assert all(f.meaning for f in RECORD_FIELDS)


def test_a_record_field_of_another_type_or_text_without_a_length_is_refused():
    @dataclasses.dataclass
    class Listed:
        values: list

    @dataclasses.dataclass
    class Unbounded:
        name: str | None = dataclasses.field(metadata={"meaning": "a name"})

    with pytest.raises(TypeError, match="Listed.values: .* is not int, bool, float or str"):
        record_fields(Listed)
    with pytest.raises(TypeError, match="Unbounded.name: a text field needs a length"):
        record_fields(Unbounded)


def test_the_table_columns_derive_from_the_record():
    table = SampleResult.__table__
    assert [c.name for c in table.columns] == ["id", "evaluation_id", *RECORD_COLUMNS]
    sql = {int: Integer, bool: Boolean, float: Float, str: String}
    for field in RECORD_FIELDS:
        column = table.c[field.name]
        assert type(column.type) is sql[field.type], field.name
        assert column.nullable == field.nullable, field.name
        assert getattr(column.type, "length", None) == field.length, field.name
        assert not column.primary_key and not column.foreign_keys and column.default is None, field.name
    # The row keys and constraints the store relies on.
    assert table.c.id.primary_key
    assert [(fk.target_fullname, fk.ondelete) for fk in table.c.evaluation_id.foreign_keys] == [
        ("evaluations.id", "CASCADE")
    ]
    assert {(i.name, tuple(i.columns.keys())) for i in table.indexes} == {
        ("ix_sample_results_evaluation_id", ("evaluation_id",))
    }
    unique = {c.name: tuple(c.columns.keys()) for c in table.constraints if c.__class__.__name__ == "UniqueConstraint"}
    assert unique == {"uq_sample_evaluation_sample": ("evaluation_id", "sample_id")}


def test_the_migrations_build_the_table_the_record_gives(store):
    """``alembic check`` for the per-sample table: a store migrated to head has the columns the record derives, in
    its order, and autogenerate finds nothing to change (the migrations stay historical snapshots)."""
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        columns = inspect(conn).get_columns("sample_results")
    assert [d for d in diffs if "sample_results" in repr(d)] == []
    assert [c["name"] for c in columns] == ["id", "evaluation_id", *RECORD_COLUMNS]
    assert [c["nullable"] for c in columns[2:]] == [f.nullable for f in RECORD_FIELDS]


def test_the_csv_columns_and_the_analysis_arrays_follow_the_record():
    assert CSV_COLUMNS == RECORD_COLUMNS
    per_sample = [f.name for f in dataclasses.fields(EvaluationRecords)]
    per_sample = per_sample[per_sample.index("sample_id") :]
    assert sorted(per_sample) == sorted(RECORD_COLUMNS)


def test_the_evaluator_inserts_record_rows_and_analyses_read_them_back(store, digits, digits_mlp):
    _, _, x, y = digits
    rows, _, _, _ = attack_chunk(digits_mlp, x[:4], y[:4], [0, 1, 2, 3], SPEC, run_checks=True)
    for row in rows:
        assert tuple(row) == RECORD_COLUMNS
        assert SampleRecord(**row).to_row() == row
        for field in RECORD_FIELDS:
            value = row[field.name]
            assert (value is None and field.nullable) or type(value) is field.type, (field.name, value)
    with store.session() as s:
        model = Model(name="mlp", checkpoint_sha256="m" * 64, arch="mlp", dataset="digits", created_at=utcnow())
        s.add(model)
        s.flush()
        model_id = model.id
    summary = evaluate(store, model_id, digits_mlp, x, y, SPEC, progress=False)
    with store.session() as s:
        records = load_records(s, summary.evaluation_id)
    dtypes = {int: np.int64, bool: np.bool_, float: np.float64, str: np.object_}
    for field in RECORD_FIELDS:
        stored = getattr(records, field.name)
        assert stored.dtype.type is dtypes[field.type], field.name
        expected = [r[field.name] for r in rows]
        if field.type is float:  # a missing distance reads as NaN
            expected = np.array([np.nan if v is None else v for v in expected])
            assert np.array_equal(stored[:4], expected, equal_nan=True), field.name
        else:
            assert stored[:4].tolist() == expected, field.name
    assert records.to_csv().splitlines()[0] == ",".join(RECORD_COLUMNS)
