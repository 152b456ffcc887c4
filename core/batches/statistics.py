"""PostgreSQL's statistics of the job table, refreshed after a batch's large ingest.

The planner chooses each statement's plan from the table's statistics, which
autovacuum refreshes once a tenth of the table has changed, and only when it gets
to the table: minutes after a million rows were written (it vacuums first), never
for a batch of less than a tenth of a large table of finished jobs. Meanwhile the
planner believes the table as it was, say with few queued jobs, and reaches "the
queued jobs sent to the broker" through every queued job's entry of
``ix_job_status``. PostgreSQL's advice after a bulk load is to ``ANALYZE``: the
ingest of a large batch does. It samples a fixed number of rows (30,000 by
default), about a second at a million rows whatever the batch's share of them.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

MIN_ROWS = 10_000
"""A batch of fewer rows: its plans are cheap enough whatever the statistics say."""
LOCK_TIMEOUT_MS = 2_000
"""ANALYZE waits for a VACUUM of the table; a caller's request does not wait long."""


def refresh_after_ingest(session: Session, rows: int) -> bool:
    """``ANALYZE job`` on PostgreSQL after an ingest of ``rows`` rows, when they are
    ``MIN_ROWS`` or more; whether it ran. Runs in its own transaction on the
    session's connection (call it after the ingest's commit); a failure is logged,
    not raised: the batch is accepted either way."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql" or rows < MIN_ROWS:
        return False
    try:
        session.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))
        session.execute(text("ANALYZE job"))
        session.commit()
    except DBAPIError as exc:
        session.rollback()
        log.warning("ANALYZE job after an ingest of %d rows failed: %s", rows, exc)
        return False
    return True
