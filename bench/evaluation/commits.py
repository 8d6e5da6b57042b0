"""The store while an evaluation runs: opening it, committing its chunks idempotently, which chunks are missing.

Each chunk's per-sample rows and its bookkeeping row (``evaluation_chunks``: attack seconds, flags, warnings, host,
device, worker) are committed in one transaction, both inserted with ON CONFLICT DO NOTHING: a run killed at any
point restarts at the chunks without rows, a chunk committed twice (a retried task, two workers racing) is stored
once, and no shared row is rewritten while chunks are committed, so any number of processes on any machines can
work on one evaluation (SQLite or PostgreSQL).
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from bench.evaluation.chunk import ChunkResult
from bench.evaluation.flags import distinct_executions
from bench.provenance import utcnow
from bench.spec import RunSpec
from bench.store import Evaluation, SampleResult, Store
from bench.store.schema import EvaluationChunk

CHUNKS = EvaluationChunk.__table__
SAMPLES = SampleResult.__table__
EVALUATIONS = Evaluation.__table__


def insert(session, table):
    """``INSERT`` of the session's dialect, which has ``on_conflict_do_nothing`` (SQLite and PostgreSQL)."""
    return (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(table)


def open_evaluation(store: Store, model_id: int, spec: RunSpec, *, overwrite: bool = False) -> int:
    """The id of model ``model_id``'s evaluation under ``spec``, created (status "running") where there is none.

    Race-free: the row is inserted with ON CONFLICT DO NOTHING on its unique key (model, spec hash), then read in
    the same transaction, so processes opening one evaluation at once all get the one row. A complete evaluation
    is returned as it is (:func:`~bench.evaluation.finalize.finalize_evaluation` gives its summary without
    recomputing).

    Args:
        overwrite: first delete the stored evaluation with its per-sample and chunk rows (in the same transaction):
            the id returned is then a new, empty evaluation. Workers still attacking the old one fail at their next
            commit, saying so: overwrite before starting workers, not while they run.
    """
    with store.session() as s:
        if overwrite:
            old = (
                select(Evaluation.id)
                .where(Evaluation.model_id == model_id, Evaluation.spec_hash == spec.hash)
                .scalar_subquery()
            )
            # Dependents first: the foreign keys cascade too, but SQLite only with its pragma on.
            s.execute(delete(SAMPLES).where(SAMPLES.c.evaluation_id.in_(old)))
            s.execute(delete(CHUNKS).where(CHUNKS.c.evaluation_id.in_(old)))
            s.execute(delete(EVALUATIONS).where(EVALUATIONS.c.id.in_(old)))
        s.execute(
            insert(s, EVALUATIONS)
            .values(
                model_id=model_id,
                spec_hash=spec.hash,
                protocol_hash=spec.protocol_hash,
                spec=spec.to_dict(),
                status="running",
                n_samples=spec.n_samples,
                flags=[],
                unreliable=False,
                attack_seconds={},
                provenance={},
                started_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["model_id", "spec_hash"])
        )
        # READ COMMITTED: this statement sees a row another transaction committed while our insert waited for it.
        return s.scalars(
            select(Evaluation.id).where(Evaluation.model_id == model_id, Evaluation.spec_hash == spec.hash)
        ).one()


def commit_chunk(store: Store, evaluation_id: int, result: ChunkResult) -> bool:
    """Commit one chunk's per-sample rows and its ``evaluation_chunks`` row in one transaction, idempotently.

    Both inserts are ON CONFLICT DO NOTHING. The chunk row goes first: a second commit of the same chunk (a retried
    task, two workers racing on it) finds it, on PostgreSQL after waiting for the first transaction, and inserts
    nothing. Nothing is read and rewritten, so concurrent commits of different chunks cannot lose an update.

    Returns:
        Whether this call committed the chunk (False: it was already committed, and the rows stored are those of
        the first commit, from the same inputs and seed).
    """
    try:
        with store.session() as s:
            statement = (
                insert(s, CHUNKS)
                .values(
                    evaluation_id=evaluation_id,
                    chunk_index=result.chunk_index,
                    first_sample=result.first_sample,
                    n_samples=len(result.rows),
                    attack_seconds=result.attack_seconds,
                    flags=result.flags,
                    warnings=result.warnings,
                    host=result.host,
                    device=result.device,
                    worker=result.worker,
                    pid=result.pid,
                    execution=result.execution,
                    started_at=result.started_at,
                    finished_at=result.finished_at,
                )
                .on_conflict_do_nothing(index_elements=["evaluation_id", "chunk_index"])
            )
            if s.get_bind().dialect.name == "postgresql":
                # psycopg reports no row count for the INSERT SQLAlchemy gives an implicit RETURNING; ask for one.
                inserted = s.execute(statement.returning(CHUNKS.c.id)).first() is not None
            else:  # SQLite's count of changed rows (RETURNING needs SQLite 3.35)
                inserted = s.execute(statement).rowcount == 1
            if not inserted:
                return False
            s.execute(
                insert(s, SAMPLES).on_conflict_do_nothing(index_elements=["evaluation_id", "sample_id"]),
                [{"evaluation_id": evaluation_id, **row} for row in result.rows],
            )
            return True
    except IntegrityError:
        with store.session() as s:
            if s.get(Evaluation, evaluation_id) is not None:
                raise
        raise RuntimeError(
            f"evaluation #{evaluation_id} was deleted (--overwrite or bench db rm in another process) while chunk "
            f"{result.chunk_index} was attacked; nothing was committed"
        ) from None


def check_evaluation(session, evaluation_id: int, spec: RunSpec) -> str:
    """The evaluation's status, after checking that it exists and was opened under ``spec``."""
    row = session.execute(
        select(Evaluation.spec_hash, Evaluation.status).where(Evaluation.id == evaluation_id)
    ).one_or_none()
    if row is None:
        raise ValueError(f"no evaluation #{evaluation_id} in the store; open one with open_evaluation")
    if row.spec_hash != spec.hash:
        raise ValueError(
            f"evaluation #{evaluation_id} was opened under another run spec (hash {row.spec_hash[:12]}…, this spec's "
            f"is {spec.hash[:12]}…); pass the spec it was opened with"
        )
    return row.status


def is_committed(store: Store, evaluation_id: int, index: int) -> bool:
    with store.session() as s:
        return (
            s.scalar(
                select(EvaluationChunk.id).where(
                    EvaluationChunk.evaluation_id == evaluation_id, EvaluationChunk.chunk_index == index
                )
            )
            is not None
        )


def stored_executions(store: Store, evaluation_id: int) -> list[dict]:
    """The distinct execution settings the evaluation's committed chunks recorded, in chunk order."""
    with store.session() as s:
        recorded = s.scalars(
            select(EvaluationChunk.execution)
            .where(EvaluationChunk.evaluation_id == evaluation_id)
            .order_by(EvaluationChunk.chunk_index)
        ).all()
    return distinct_executions(recorded)


def missing_chunks(store: Store, evaluation_id: int, spec: RunSpec) -> list[int]:
    """Indices into ``spec.chunks()`` of the chunks of evaluation ``evaluation_id`` not committed yet, ascending."""
    with store.session() as s:
        check_evaluation(s, evaluation_id, spec)
    with store.session() as s:
        done = set(s.scalars(select(EvaluationChunk.chunk_index).where(EvaluationChunk.evaluation_id == evaluation_id)))
    return [i for i in range(len(spec.chunks())) if i not in done]
