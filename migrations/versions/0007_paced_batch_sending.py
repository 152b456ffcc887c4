"""paced batch sending: an index of the batch jobs the feeder has not sent yet

A batch's jobs are committed with ``enqueued_at`` NULL and sent a window at a
time (core.feed); this partial index finds the next ones of a queue.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNSENT = sa.text("status = 'queued' AND enqueued_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_job_unsent",
        "job",
        ["model", "priority", "id"],
        postgresql_where=UNSENT,
        sqlite_where=UNSENT,
    )


def downgrade() -> None:
    op.drop_index("ix_job_unsent", table_name="job")
