"""batch request counts kept as jobs finish: batch counters and batch_tally rows

Each transaction that finishes jobs of a batch inserts one batch_tally row (what
it finished); the sweeper folds them into the batch's counters. A status read
sums the counters and the few unfolded rows instead of counting the batch's job
rows. Existing batches get their counters from their job rows here.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = ("completed_count", "failed_count", "prompt_tokens", "completion_tokens")


def upgrade() -> None:
    op.create_table(
        "batch_tally",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_tally")),
    )
    with op.batch_alter_table("batch_tally", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batch_tally_batch_id"), ["batch_id"], unique=False)
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("completed_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("failed_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("completion_tokens", sa.BigInteger(), server_default="0", nullable=False)
        )
    op.execute(
        """
        UPDATE batch SET
          completed_count = (SELECT count(*) FROM job
                             WHERE job.batch_id = batch.id AND job.status = 'succeeded'),
          failed_count = (SELECT count(*) FROM job
                          WHERE job.batch_id = batch.id AND job.status IN ('failed', 'cancelled')),
          prompt_tokens = (SELECT coalesce(sum(prompt_tokens), 0) FROM job
                           WHERE job.batch_id = batch.id AND job.status = 'succeeded'),
          completion_tokens = (SELECT coalesce(sum(completion_tokens), 0) FROM job
                               WHERE job.batch_id = batch.id AND job.status = 'succeeded')
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("batch", schema=None) as batch_op:
        for column in reversed(COUNTERS):
            batch_op.drop_column(column)
    with op.batch_alter_table("batch_tally", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batch_tally_batch_id"))
    op.drop_table("batch_tally")
