"""model ranked flag: sanity runs kept off the ranked tables

A model evaluated as a sanity run (random weights, a smoke test of the pipeline) was ranked beside real models.
``models`` gets ``ranked`` (true for every existing row and by default; ``bench evaluate --unranked`` and
``bench db rank MODEL --off`` set it false). Unranked models stay stored and browsable; ranked tables leave them out.

Revision ID: 0004_model_ranked
Revises: 0003_model_identity
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_model_ranked"
down_revision = "0003_model_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # recreate="never": adding a column needs no table rebuild on SQLite, and rebuilding ``models`` on the store's
    # own connection (foreign keys on) would cascade its DROP to every evaluation. The server default fills the
    # existing rows: every model stored before this revision was ranked.
    with op.batch_alter_table("models", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("ranked", sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    # Dropping a column rebuilds the table on SQLite; run it without foreign keys (the plain alembic command does).
    with op.batch_alter_table("models") as batch_op:
        batch_op.drop_column("ranked")
