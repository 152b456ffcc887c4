"""the active-jobs quota without reading a batch's job rows: a partial index of an
owner's queued and running jobs of no batch, and a validating batch's rows so far

The quota counts an owner's jobs of no batch through ``ix_job_owner_active`` and
takes a batch's unfinished jobs from its counters (core.tally); a batch being
validated counts its input file's lines or, without a file (``genq run``), the
rows its ingest has committed (``batch.ingested``, renewed with each chunk).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOOSE_ACTIVE = sa.text("batch_id IS NULL AND status IN ('queued', 'running')")


def upgrade() -> None:
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ingested", sa.Integer(), server_default="0", nullable=False))
    # A batch validating now (its ingest mid-way) counts the rows it has written.
    op.execute(
        """
        UPDATE batch SET ingested = (SELECT count(*) FROM job WHERE job.batch_id = batch.id)
        WHERE status = 'validating'
        """
    )
    op.create_index(
        "ix_job_owner_active",
        "job",
        ["owner"],
        postgresql_where=LOOSE_ACTIVE,
        sqlite_where=LOOSE_ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ix_job_owner_active", table_name="job")
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.drop_column("ingested")
