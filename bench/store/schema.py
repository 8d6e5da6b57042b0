"""Tables of the results store.

Numbers are stored as numbers (fractions in [0, 1], distances in input units); formatting belongs to the
CLI and the site. Every evaluation row carries its run spec and provenance (protocol section 5), and every
per-sample row is unique per (evaluation, sample_id) so a resumed run can never duplicate a sample. Each chunk's
bookkeeping (attack seconds, flags, who ran it where) is a row of its own, unique per (evaluation, chunk), written
in the transaction of the chunk's per-sample rows: workers never rewrite a shared row while an evaluation runs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from bench.records import RECORD_FIELDS, RecordField


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Model(Base):
    """A network the benchmark knows: a dense parent or a pruned child, identified by its checkpoint's content and
    the input normalisation in front of it (the same weights behind another mean/std are another model)."""

    __tablename__ = "models"
    __table_args__ = (Index("uq_models_checkpoint_normalization", "checkpoint_sha256", "normalization", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    # bench.models.normalize.normalization_key: "dataset" for the dataset's own mean/std, else "MEAN/STD" as float32
    # decimals ("0.0,0.0,0.0/1.0,1.0,1.0": raw [0, 1] inputs).
    normalization: Mapped[str] = mapped_column(String(255), default="dataset", server_default="dataset")
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(64), default="dense")
    arch: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(64))
    # "dense", "US" (unstructured) or "S" (structured), as in the APB's model ids.
    structure: Mapped[str] = mapped_column(String(16), default="dense")
    target_sparsity: Mapped[float | None] = mapped_column(Float)
    measured_sparsity: Mapped[float] = mapped_column(Float, default=0.0)
    layer_sparsity: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    params: Mapped[int] = mapped_column(BigInteger, default=0)
    nonzero_params: Mapped[int] = mapped_column(BigInteger, default=0)
    flops: Mapped[int] = mapped_column(BigInteger, default=0)
    nonzero_flops: Mapped[int] = mapped_column(BigInteger, default=0)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    source: Mapped[str] = mapped_column(String(64), default="local")
    # False for a sanity run (random weights, a smoke test): stored and shown, never ranked beside real models
    # (bench evaluate --unranked, bench db rank).
    ranked: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # Reported numbers with their attack and source: {"clean": .., "robust": .., "attack": .., "source": ..}.
    reported: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    taxonomy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # How the model was made (method config, seed, epochs, wall time, code version).
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    parent: Mapped[Model | None] = relationship(remote_side=[id])
    evaluations: Mapped[list[Evaluation]] = relationship(back_populates="model", cascade="all, delete-orphan")


class Evaluation(Base):
    """One run of the standardized protocol on one model, keyed by the hash of its run spec."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("model_id", "spec_hash", name="uq_evaluation_model_spec"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    spec_hash: Mapped[str] = mapped_column(String(64), index=True)
    # Hash of the fields that define the protocol (not device or batch size): evaluations with the same
    # protocol hash attack the same samples under the same threat model and can be compared per sample.
    protocol_hash: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | complete
    n_samples: Mapped[int] = mapped_column(Integer)
    clean_accuracy: Mapped[float | None] = mapped_column(Float)
    aa_robust_accuracy: Mapped[float | None] = mapped_column(Float)
    fmn_robust_accuracy: Mapped[float | None] = mapped_column(Float)
    best_robust_accuracy: Mapped[float | None] = mapped_column(Float)
    fmn_median_distance: Mapped[float | None] = mapped_column(Float)
    n_fmn_beat_aa: Mapped[int | None] = mapped_column(Integer)
    # How far plain FMN was from the best-known distances (bench.analysis.best_known; None before the warm start,
    # spec fmn_init "none"): median best-known distance, AttackBench's local optimality of plain FMN, the median
    # ratio plain FMN / best known and the samples where plain FMN was more than 1 % above it (or found none).
    best_median_distance: Mapped[float | None] = mapped_column(Float)
    fmn_local_optimality: Mapped[float | None] = mapped_column(Float)
    fmn_best_median_ratio: Mapped[float | None] = mapped_column(Float)
    n_fmn_above_best: Mapped[int | None] = mapped_column(Integer)
    # AutoAttack sanity-check flags and our own ("fmn_beat_autoattack"); any AutoAttack flag marks the
    # evaluation potentially unreliable (RobustBench's "unreliable").
    flags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    unreliable: Mapped[bool] = mapped_column(Boolean, default=False)
    attack_seconds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    model: Mapped[Model] = relationship(back_populates="evaluations")
    samples: Mapped[list[SampleResult]] = relationship(
        back_populates="evaluation", cascade="all, delete-orphan", passive_deletes=True
    )


# SQL type of each per-sample field's Python type (bench.records); text fields take their length from the record.
_SQL_TYPES = {int: Integer, bool: Boolean, float: Float}


def _sample_column(field: RecordField) -> Column:
    sql_type = String(field.length) if field.type is str else _SQL_TYPES[field.type]()
    return Column(field.name, sql_type, nullable=field.nullable)


class SampleResult(Base):
    """The protocol's outcome for one test sample (sample_id = index in the canonical test split).

    The per-sample columns are :class:`bench.records.SampleRecord`'s fields, in its order, with its types and
    nullability (their meaning is documented there); this table adds the row keys."""

    __table__ = Table(
        "sample_results",
        Base.metadata,
        Column("id", Integer, primary_key=True),
        Column("evaluation_id", ForeignKey("evaluations.id", ondelete="CASCADE"), nullable=False, index=True),
        *(_sample_column(field) for field in RECORD_FIELDS),
        UniqueConstraint("evaluation_id", "sample_id", name="uq_sample_evaluation_sample"),
    )

    evaluation: Mapped[Evaluation] = relationship(back_populates="samples")


class EvaluationChunk(Base):
    """One committed chunk of an evaluation (the samples ``spec.chunks()[chunk_index]``) and how it was attacked.

    Inserted in the transaction that inserts the chunk's per-sample rows, so a chunk has a row here exactly when its
    samples are stored: the missing chunks are the ones without a row. Inserts are idempotent (ON CONFLICT DO
    NOTHING on (evaluation, chunk)): a chunk committed twice, by a retried task or by two workers racing, leaves
    the first commit's rows. The evaluation's attack seconds, flags and AutoAttack warnings are aggregated from
    these rows when it is finalised (``bench.evaluate.finalize_evaluation``).

    A chunk committed before this table existed was moved here by migration 0005 with ``worker`` "migrated" and no
    host, device, pid or times; its evaluation's totals up to then are carried by the first such chunk.
    """

    __tablename__ = "evaluation_chunks"
    __table_args__ = (UniqueConstraint("evaluation_id", "chunk_index", name="uq_chunk_evaluation_chunk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    # Position in the spec's chunk list; the chunk holds sample ids first_sample .. first_sample + n_samples - 1.
    chunk_index: Mapped[int] = mapped_column(Integer)
    first_sample: Mapped[int] = mapped_column(Integer)
    n_samples: Mapped[int] = mapped_column(Integer)
    # Seconds per stage ("clean", AutoAttack's stages, "fmn", "fmn_from_autoattack") spent on this chunk.
    attack_seconds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # AutoAttack sanity-check flags and our own raised while attacking this chunk, and AutoAttack's warnings.
    flags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    warnings: Mapped[list[Any]] = mapped_column(JSON, default=list)
    host: Mapped[str | None] = mapped_column(String(255))
    # The torch device, with the card's name on CUDA ("cuda:0 NVIDIA H100 80GB HBM3").
    device: Mapped[str | None] = mapped_column(String(255))
    # Who attacked it: the executor's worker id (a SLURM array task, "local-2", ...) when it gave one, and the pid.
    worker: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    # How the model ran (bench.performance.execution_settings: channels_last, frozen parameters, TF32 off, ...).
    execution: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
