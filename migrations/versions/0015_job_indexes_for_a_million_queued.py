"""job indexes for a million queued jobs: the sweeper's sent jobs indexed apart;
fewer index entries written per job

- ``ix_job_sent (model, priority, id) WHERE status = 'queued' AND enqueued_at IS NOT
  NULL``: every sweep (10 s) counted the queued jobs sent to the broker, and looked for
  stale ones in id order, among every queued job: a million behind a large batch's
  unsent tail. It now reads the sent ones only (the feeder's window and web apps' jobs).
- ``ix_job_owner`` dropped: ``ix_job_owner_status (owner, status)`` serves lookups by
  owner alone.
- ``ix_job_submission_id`` only for jobs with a submission (``POST /v1/jobs/bulk``).

Each update of a job's status writes a new entry into every index of the job table
(the status is indexed, so it is never a HOT update), three times per job: the two
indexes that go away held an entry for every job.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SENT = sa.text("status = 'queued' AND enqueued_at IS NOT NULL")
SUBMITTED = sa.text("submission_id IS NOT NULL")


def _create(name: str, columns: list[str], where: sa.TextClause | None = None) -> None:
    if op.get_context().dialect.name != "postgresql":
        op.create_index(name, "job", columns, sqlite_where=where)
        return
    # Without blocking the job table's writes (an index reads the whole table).
    with op.get_context().autocommit_block():
        op.create_index(name, "job", columns, postgresql_where=where, postgresql_concurrently=True)


def _drop(name: str) -> None:
    if op.get_context().dialect.name != "postgresql":
        op.drop_index(name, table_name="job")
        return
    with op.get_context().autocommit_block():
        op.drop_index(name, table_name="job", postgresql_concurrently=True)


def _replace(name: str, columns: list[str], where: sa.TextClause | None = None) -> None:
    """The index ``name`` rebuilt: on PostgreSQL beside the old one, then swapped in."""
    if op.get_context().dialect.name != "postgresql":
        _drop(name)
        _create(name, columns, where)
        return
    _create(f"{name}_next", columns, where)
    _drop(name)
    op.execute(f"ALTER INDEX {name}_next RENAME TO {name}")


def upgrade() -> None:
    _create("ix_job_sent", ["model", "priority", "id"], SENT)
    _drop("ix_job_owner")
    _replace("ix_job_submission_id", ["submission_id"], SUBMITTED)


def downgrade() -> None:
    _replace("ix_job_submission_id", ["submission_id"])
    _create("ix_job_owner", ["owner"])
    _drop("ix_job_sent")
