"""best-known distances: FMN's warm start from AutoAttack's adversarial example

Per sample: the norm of AutoAttack's adversarial perturbation, FMN's distance when started from that adversarial
example, the best-known minimal distance (the smallest of plain FMN, warm-started FMN and AutoAttack), the attack
that found it and its signed epsilon. Per evaluation: how far plain FMN was from the best known (median best-known
distance, AttackBench's local optimality, median ratio, samples more than 1 % above). Every new column is nullable:
rows written before hold None and read unchanged.

Revision ID: 0002_best_known
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_best_known"
down_revision = "0001"
branch_labels = None
depends_on = None

# (name, type): every column nullable.
SAMPLE_COLUMNS = (
    ("aa_distance", sa.Float),
    ("fmn_warm_distance", sa.Float),
    ("best_distance", sa.Float),
    ("best_attack", lambda: sa.String(length=32)),
    ("signed_best_eps", sa.Float),
)
EVALUATION_COLUMNS = (
    ("best_median_distance", sa.Float),
    ("fmn_local_optimality", sa.Float),
    ("fmn_best_median_ratio", sa.Float),
    ("n_fmn_above_best", sa.Integer),
)


def upgrade() -> None:
    # recreate="never": adding a nullable column needs no table rebuild on SQLite, and a rebuild of a table other
    # tables point to, with foreign keys on, would cascade deletes.
    with op.batch_alter_table("sample_results", recreate="never") as batch_op:
        for name, kind in SAMPLE_COLUMNS:
            batch_op.add_column(sa.Column(name, kind(), nullable=True))
    with op.batch_alter_table("evaluations", recreate="never") as batch_op:
        for name, kind in EVALUATION_COLUMNS:
            batch_op.add_column(sa.Column(name, kind(), nullable=True))


def downgrade() -> None:
    # Dropping columns rebuilds the tables on SQLite; run it without foreign keys (the plain alembic command does).
    with op.batch_alter_table("evaluations") as batch_op:
        for name, _ in reversed(EVALUATION_COLUMNS):
            batch_op.drop_column(name)
    with op.batch_alter_table("sample_results") as batch_op:
        for name, _ in reversed(SAMPLE_COLUMNS):
            batch_op.drop_column(name)
