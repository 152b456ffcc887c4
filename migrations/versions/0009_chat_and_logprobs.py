"""chat and logprobs: a job's messages and per-token log-probabilities; whether a
worker's model has a chat template

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("logprobs", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("messages", sa.JSON(), nullable=True))
    with op.batch_alter_table("worker_node", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("chat", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("worker_node", schema=None) as batch_op:
        batch_op.drop_column("chat")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("messages")
        batch_op.drop_column("logprobs")
