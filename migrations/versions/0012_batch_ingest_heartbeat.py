"""batch ingest in chunks: the heartbeat of a batch being validated

A batch's jobs are inserted in chunks, each its own transaction, while the batch
is ``validating``; each chunk renews ``ingest_heartbeat_at``. A validating batch
whose heartbeat stopped (its creator died) is failed by the sweeper, its jobs
deleted; NULL marks one the sweeper has claimed (core.batches.staging).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ingest_heartbeat_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.drop_column("ingest_heartbeat_at")
