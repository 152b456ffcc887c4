"""One lock order for every write to job rows: ascending id.

Two transactions that lock rows in different orders can each hold a row the other
waits for: a deadlock, which PostgreSQL breaks by aborting one of them. A worker's
store (rows in the order its jobs finished), its monitor's lease renewal and
progress (rows in heap order), a batch cancel and the sweeper all write job rows,
so each of them either

- locks its rows in id order first (:func:`lock_in_order`, or the
  :func:`in_id_order` predicate for a single UPDATE) and then writes; or
- skips rows another transaction holds (``skip_locked``): a lease renewal or a
  progress note for a job whose result is being stored right now can simply be
  left out, and the sweeper looks again at its next sweep.

A transaction that never waits cannot be part of a wait cycle, and transactions
that wait all take their locks in one order, so no cycle can form. On SQLite
``FOR UPDATE`` is not rendered (a write transaction already holds the database).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import CTE, ColumnElement, select
from sqlalchemy.orm import Session

from core.models import Job
from core.status import JobStatus


def in_id_order(where: ColumnElement[bool], *, skip_locked: bool = False) -> ColumnElement[bool]:
    """A WHERE for ``UPDATE job``: the rows matching ``where``, locked in id order
    by a sub-select (``ORDER BY id FOR UPDATE``) before the update writes them;
    with ``skip_locked`` rows another transaction holds are left out."""
    locked = select(Job.id).where(where).order_by(Job.id).with_for_update(skip_locked=skip_locked)
    return Job.id.in_(locked.scalar_subquery())


def locked_by_id(job_ids: Collection[str], *columns: Any) -> CTE:
    """``WITH locked AS MATERIALIZED (SELECT id, columns… FROM job WHERE id IN (…)
    ORDER BY id FOR UPDATE)``: these job rows, found by their primary key alone and
    locked in id order, for a statement that then checks ``columns`` of the locked
    rows (``UPDATE job … WHERE id IN (SELECT id FROM locked WHERE status …)``).

    A condition on status next to the ids (``WHERE id IN (…) AND status = 'queued'``)
    lets PostgreSQL's planner meet the ids through ``ix_job_status`` instead, reading
    the entry of every job of that status: a million queued ones behind a large
    batch, whenever the table's statistics are stale (for minutes after a large
    ingest, until autovacuum has analyzed it). The materialized CTE is a fence: no
    condition outside it is pushed into its scan (SQLite gets a plain CTE).

    Every row named is locked, whatever its status: a claim naming a job another
    worker runs (a duplicate message) waits for that worker's store, and that
    worker's lease renewal skips the row for one round (it skips locked rows). The
    lock is ``FOR NO KEY UPDATE``, so inserts referencing the row are not held up.
    """
    return (
        select(Job.id, *columns)
        .where(Job.id.in_(sorted(job_ids)))
        .order_by(Job.id)
        .with_for_update(key_share=True)  # FOR NO KEY UPDATE: no id is changed
        .cte("locked")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )


def lock_in_order(
    session: Session, job_ids: Collection[str], *, skip_locked: bool = False
) -> dict[str, JobStatus]:
    """Lock these job rows in id order for the rest of the transaction; returns the
    status of each row locked (all that exist, or with ``skip_locked`` those nobody
    else holds)."""
    if not job_ids:
        return {}
    query = (
        select(Job.id, Job.status)
        .where(Job.id.in_(sorted(job_ids)))
        .order_by(Job.id)
        .with_for_update(skip_locked=skip_locked)
    )
    return {job_id: status for job_id, status in session.execute(query)}  # noqa: C416
