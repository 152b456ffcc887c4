"""job rows laid out for cheap updates: fillfactor 80, no index on lease_expires_at

A job row is updated two to many times (claim, progress notes, lease renewals,
result). PostgreSQL can write an update as a heap-only tuple (HOT: no index
entries, the old version pruned on the page without VACUUM) when no indexed
column changes and the page has room. Leaving 20% of each page free gives that
room; dropping the index on ``lease_expires_at`` (the sweeper finds expired
leases among the running jobs through the status index) makes lease renewals
HOT too, like progress notes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_lease_expires_at"))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE job SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE job RESET (fillfactor)")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_job_lease_expires_at"), ["lease_expires_at"], unique=False
        )
