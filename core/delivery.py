"""A worker's writes besides status changes (lease renewal, progress), and the
sweeper's queries. Every status change is in :mod:`core.jobstate`.

A running job's lease expires unless its worker renews it; the sweeper hands
expired jobs back (``jobstate.reclaim_expired``) and re-sends queued jobs whose
message the broker may have lost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import JSON, Integer, bindparam, delete, func, select, text, update
from sqlalchemy.orm import Session

from core.jobstate import Claim
from core.locking import in_id_order, lock_in_order
from core.models import SENT_JOBS, Job, Lock, job_column, job_through, utcnow
from core.queue import Route
from core.status import FINAL_STATUSES, JobStatus

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING


ProgressUpdate = tuple[Claim, int, str, int | None]
"""``(claim, completion tokens, text so far, prompt tokens or None)``."""


def record_progress(session: Session, updates: Iterable[ProgressUpdate]) -> None:
    """Store running jobs' partial output (first sequence) and token counts, as
    one executemany statement for all of them. The prompt's token count is known
    from the first step, so a running job shows its usage whole.

    Rows another transaction holds (a result being stored) are skipped, not
    waited for: their progress no longer matters (see core.locking)."""
    changes = sorted(updates, key=lambda update: update[0].job_id)
    free = lock_in_order(session, [change[0].job_id for change in changes], skip_locked=True)
    rows = [
        {
            "b_id": claim.job_id,
            "b_token": claim.token,
            "b_outputs": [text],
            "b_tokens": tokens,
            "b_prompt": prompt_tokens,
        }
        for claim, tokens, text, prompt_tokens in changes
        if claim.job_id in free
    ]
    if not rows:
        return
    statement = (
        update(Job)
        .where(
            Job.id == bindparam("b_id"),
            Job.lease_token == bindparam("b_token"),
            Job.status == RUNNING,
        )
        .values(
            outputs=bindparam("b_outputs", type_=JSON),
            completion_tokens=bindparam("b_tokens"),
            prompt_tokens=func.coalesce(bindparam("b_prompt", type_=Integer), Job.prompt_tokens),
        )
        .execution_options(synchronize_session=False)
    )
    session.connection().execute(statement, rows)


def renew_leases(session: Session, claims: Iterable[Claim], *, lease_s: float) -> None:
    """Extend the leases of the jobs this worker holds, but for those whose rows
    another transaction holds right now (their result being stored; a renewal
    that waited could close a wait cycle, see core.locking). Called every third of
    a lease, so a row skipped once is renewed next time."""
    tokens = sorted({c.token for c in claims})  # a group's claims share a token
    if tokens:
        held = Job.lease_token.in_(tokens) & (Job.status == RUNNING)
        session.execute(
            update(Job)
            .where(in_id_order(held, skip_locked=True))
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
        )


def cancelled_among(session: Session, job_ids: Iterable[str]) -> set[str]:
    """Which of these jobs have been cancelled (so their generation should stop)."""
    ids: Sequence[str] = list(job_ids)
    if not ids:
        return set()
    query = select(Job.id).where(Job.id.in_(ids), Job.status == JobStatus.CANCELLED)
    return set(session.scalars(query))


# --- the sweeper's queries -------------------------------------------------------


def acquire_lock(session: Session, name: str, *, holder: str, ttl_s: float) -> bool:
    """Take or renew a named lock until ``ttl_s`` from now; False if another holds it."""
    now = utcnow()
    expires = now + dt.timedelta(seconds=ttl_s)
    taken = session.execute(
        update(Lock)
        .where(Lock.name == name, (Lock.holder == holder) | (Lock.expires_at < now))
        .values(holder=holder, expires_at=expires)
    )
    if _rowcount(taken):
        return True
    if session.get(Lock, name) is not None:
        return False
    session.add(Lock(name=name, holder=holder, expires_at=expires))
    try:
        session.flush()
    except Exception:  # another sweeper inserted it first
        session.rollback()
        return False
    return True


def _sent_jobs(session: Session) -> Any:
    """The job table read through ``ix_job_sent``: the queued jobs sent to the broker
    (the feeder's window, web apps' jobs), not the unsent tail of a large batch."""
    return job_through("ix_job_sent", session.get_bind().dialect.name)


def queued_counts(session: Session) -> dict[tuple[str, str], int]:
    """Queued jobs sent to the broker per (model, priority): what each queue should
    hold (a batch's jobs the feeder has not sent yet are not counted)."""
    model, priority = job_column("model"), job_column("priority")
    rows = session.execute(
        select(model, priority, func.count())
        .select_from(_sent_jobs(session))
        .where(text(SENT_JOBS))  # unsent ones are the feeder's (core.feed)
        .group_by(model, priority)
    )
    return {(model, priority): count for model, priority, count in rows}


def stale_queued(
    session: Session, *, model: str, priority: str, older_than_s: float, limit: int
) -> list[Route]:
    """Queued jobs of one queue last sent more than ``older_than_s`` ago, oldest
    first; their send time is reset, as the caller re-sends them."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    ids = list(
        session.scalars(
            select(job_column("id"))
            .select_from(_sent_jobs(session))
            .where(
                text(SENT_JOBS),  # unsent ones are the feeder's (core.feed)
                job_column("model") == model,
                job_column("priority") == priority,
                job_column("enqueued_at") < cutoff,
            )
            .order_by(job_column("id"))
            .limit(limit)
            .with_for_update(skip_locked=True)  # a worker claiming it: not stale
        )
    )
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=utcnow()))
    return [Route(job_id, model, priority) for job_id in ids]


def purge_finished(session: Session, *, older_than_days: float) -> int:
    """Delete finished jobs older than the retention age; returns how many."""
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    result = session.execute(
        delete(Job).where(Job.status.in_(FINAL_STATUSES), Job.finished_at < cutoff)
    )
    return _rowcount(result)


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count
