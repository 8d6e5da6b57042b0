"""evaluation chunks: per-chunk bookkeeping in its own table, so that concurrent workers never rewrite a shared row

Each committed chunk of an evaluation gets a row in ``evaluation_chunks`` (unique per evaluation and chunk index)
with its attack seconds per stage, flags, AutoAttack warnings, host, device, worker, pid and times, inserted in the
transaction of the chunk's per-sample rows. Until now every commit read, modified and rewrote the evaluation's
``attack_seconds``, ``flags`` and ``provenance`` columns, which loses one of two concurrent updates under
PostgreSQL's READ COMMITTED; the evaluation's aggregates are now computed from this table when it is finalised.

Existing stores are upgraded in place, moving what the old rows tell: every chunk whose per-sample rows are all
stored (the old evaluator committed whole chunks) gets a row with worker "migrated"; the first of them carries the
evaluation's attack seconds, flags and AutoAttack warnings as stored, so that a running evaluation resumed after
the upgrade sums them with its new chunks. A finished evaluation keeps its row unchanged.

Revision ID: 0005_evaluation_chunks
Revises: 0004_model_ranked
"""

import math

import sqlalchemy as sa
from alembic import op

revision = "0005_evaluation_chunks"
down_revision = "0004_model_ranked"
branch_labels = None
depends_on = None

MIGRATED = "migrated"
# RunSpec's batch size default, for a stored spec that (never in practice) lacks the field.
_DEFAULT_BATCH_SIZE = 250

_evaluations = sa.table(
    "evaluations",
    sa.column("id", sa.Integer),
    sa.column("spec", sa.JSON),
    sa.column("status", sa.String),
    sa.column("n_samples", sa.Integer),
    sa.column("flags", sa.JSON),
    sa.column("attack_seconds", sa.JSON),
    sa.column("provenance", sa.JSON),
)
_samples = sa.table("sample_results", sa.column("evaluation_id", sa.Integer), sa.column("sample_id", sa.Integer))
_chunks = sa.table(
    "evaluation_chunks",
    sa.column("evaluation_id", sa.Integer),
    sa.column("chunk_index", sa.Integer),
    sa.column("first_sample", sa.Integer),
    sa.column("n_samples", sa.Integer),
    sa.column("attack_seconds", sa.JSON),
    sa.column("flags", sa.JSON),
    sa.column("warnings", sa.JSON),
    sa.column("worker", sa.String),
)


def upgrade() -> None:
    op.create_table(
        "evaluation_chunks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("evaluation_id", sa.Integer(), nullable=False),
        sa.Column("chunk_index", sa.Integer(), nullable=False),
        sa.Column("first_sample", sa.Integer(), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("attack_seconds", sa.JSON(), nullable=False),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("device", sa.String(length=255), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("execution", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("evaluation_id", "chunk_index", name="uq_chunk_evaluation_chunk"),
    )
    conn = op.get_bind()
    evaluations = conn.execute(
        sa.select(
            _evaluations.c.id,
            _evaluations.c.spec,
            _evaluations.c.n_samples,
            _evaluations.c.flags,
            _evaluations.c.attack_seconds,
            _evaluations.c.provenance,
        ).order_by(_evaluations.c.id)
    ).all()
    for evaluation_id, spec, n_samples, flags, seconds, provenance in evaluations:
        stored = set(conn.scalars(sa.select(_samples.c.sample_id).where(_samples.c.evaluation_id == evaluation_id)))
        batch = int((spec or {}).get("batch_size") or _DEFAULT_BATCH_SIZE)
        rows = []
        for index in range(math.ceil(n_samples / batch)):
            ids = range(index * batch, min((index + 1) * batch, n_samples))
            if not all(i in stored for i in ids):
                continue  # never committed: the evaluator attacks it when the evaluation resumes
            first = not rows
            rows.append(
                dict(
                    evaluation_id=evaluation_id,
                    chunk_index=index,
                    first_sample=ids.start,
                    n_samples=len(ids),
                    attack_seconds=dict(seconds or {}) if first else {},
                    flags=list(flags or []) if first else [],
                    warnings=list((provenance or {}).get("autoattack_warnings", [])) if first else [],
                    worker=MIGRATED,
                )
            )
        if rows:
            conn.execute(sa.insert(_chunks), rows)


def downgrade() -> None:
    # The older evaluator keeps a running evaluation's totals in its own row: put them back before the table goes.
    conn = op.get_bind()
    running = conn.execute(
        sa.select(_evaluations.c.id, _evaluations.c.provenance).where(_evaluations.c.status == "running")
    ).all()
    for evaluation_id, provenance in running:
        chunks = conn.execute(
            sa.select(_chunks.c.attack_seconds, _chunks.c.flags, _chunks.c.warnings)
            .where(_chunks.c.evaluation_id == evaluation_id)
            .order_by(_chunks.c.chunk_index)
        ).all()
        stages = sorted({stage for seconds, _, _ in chunks for stage in seconds})
        totals = {stage: math.fsum(seconds.get(stage, 0.0) for seconds, _, _ in chunks) for stage in stages}
        flags = sorted({flag for _, chunk_flags, _ in chunks for flag in chunk_flags})
        warnings = [warning for _, _, chunk_warnings in chunks for warning in chunk_warnings]
        provenance = dict(provenance or {})
        if warnings:
            provenance["autoattack_warnings"] = warnings
        conn.execute(
            sa.update(_evaluations)
            .where(_evaluations.c.id == evaluation_id)
            .values(attack_seconds=totals, flags=flags, provenance=provenance)
        )
    op.drop_table("evaluation_chunks")
