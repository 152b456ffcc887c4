"""the job's reproducibility record names the kernels its matrix products ran on

``products``: ``model`` (the model's own, the kernels ``generate`` calls), ``packed``
(weights packed once for oneDNN: the same sums in another order, so a score's last bits
can differ; fp32 on a CPU packs by default since GENQ_FP32_PRODUCTS) or ``none`` (the
fake engine). NULL for jobs stored before.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column without a default: PostgreSQL adds it without rewriting the table.
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("products", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("products")
