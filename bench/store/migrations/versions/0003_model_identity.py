"""model identity: a checkpoint's bytes and the input normalisation in front of them

A model was found by its checkpoint's sha256 alone, so the same weights evaluated behind another mean/std (e.g.
``bench evaluate --normalization none``) would have reused the first model's row and evaluations. ``models`` gets
``normalization`` (``bench.models.normalize.normalization_key``: "dataset" for the dataset's own constants, else
"MEAN/STD" as float32 decimals), filled from each row's provenance, and the unique index moves from
``checkpoint_sha256`` to ``(checkpoint_sha256, normalization)``.

Revision ID: 0003_model_identity
Revises: 0002_best_known
"""

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0003_model_identity"
down_revision = "0002_best_known"
branch_labels = None
depends_on = None

_DEFAULT = "dataset"


def _float32_text(values) -> str:
    # As bench.models.normalize: the layer holds float32, and str() of a numpy float32 is its shortest
    # round-tripping decimal.
    return ",".join(str(np.float32(float(v)) + np.float32(0.0)) for v in values)


def _key(dataset: str, normalization) -> str:
    """The key bench.models.normalize.normalization_key gives the normalisation a row was registered with."""
    if not isinstance(normalization, dict) or "mean" not in normalization or "std" not in normalization:
        return _DEFAULT  # plain checkpoints: the dataset's constants (bench.store.registration.load_stored_model)
    text = f"{_float32_text(normalization['mean'])}/{_float32_text(normalization['std'])}"
    try:
        from bench.data import get_dataset_info

        info = get_dataset_info(dataset)
    except (KeyError, ValueError):  # a dataset no longer registered: its constants cannot be compared
        return text
    return _DEFAULT if text == f"{_float32_text(info.mean)}/{_float32_text(info.std)}" else text


def upgrade() -> None:
    # recreate="never": SQLite rebuilds a table for most ALTERs, and dropping ``models`` while the store's
    # connection has foreign keys on would cascade to every evaluation. A new column and new indexes need no rebuild.
    with op.batch_alter_table("models", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("normalization", sa.String(length=255), nullable=False, server_default=_DEFAULT))
        batch_op.drop_index("ix_models_checkpoint_sha256")

    models = sa.table(
        "models",
        sa.column("id", sa.Integer),
        sa.column("dataset", sa.String),
        sa.column("provenance", sa.JSON),
        sa.column("normalization", sa.String),
    )
    conn = op.get_bind()
    rows = conn.execute(sa.select(models.c.id, models.c.dataset, models.c.provenance)).all()
    for row_id, dataset, provenance in rows:
        key = _key(dataset, (provenance or {}).get("normalization"))
        if key != _DEFAULT:
            conn.execute(sa.update(models).where(models.c.id == row_id).values(normalization=key))

    with op.batch_alter_table("models", recreate="never") as batch_op:
        batch_op.create_index("uq_models_checkpoint_normalization", ["checkpoint_sha256", "normalization"], unique=True)


def downgrade() -> None:
    # Fails on the unique index when the same bytes are stored under two normalisations: delete one model first.
    # Dropping a column rebuilds the table on SQLite; run it without foreign keys (the plain alembic command does).
    with op.batch_alter_table("models") as batch_op:
        batch_op.drop_index("uq_models_checkpoint_normalization")
        batch_op.create_index("ix_models_checkpoint_sha256", ["checkpoint_sha256"], unique=True)
        batch_op.drop_column("normalization")
