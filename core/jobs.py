"""Reading jobs: one, a page, a bulk submission's.

Jobs are created by :mod:`core.submit` and change status only through
:mod:`core.jobstate`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.jobstate import JobNotFoundError
from core.models import Job, WebhookDelivery
from core.schemas import JobRead
from core.status import FINAL_STATUSES, JobStatus


def views(session: Session, jobs: Sequence[Job]) -> list[JobRead]:
    """The API view of each job, with its webhook delivery: one query for all of
    them (none when no job is final: only a final job can have a delivery)."""
    final = [job.id for job in jobs if job.status in FINAL_STATUSES]
    newest: dict[str | None, WebhookDelivery] = {}
    if final:
        query = (
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id.in_(final))
            .order_by(WebhookDelivery.created_at)
        )
        newest = {row.job_id: row for row in session.scalars(query)}  # the last one wins
    return [JobRead.from_job(job, newest.get(job.id)) for job in jobs]


def view(session: Session, job: Job) -> JobRead:
    """The API view of one job (see :func:`views`)."""
    return views(session, [job])[0]


def submission_jobs(session: Session, submission_id: str) -> list[Job]:
    """The jobs of one bulk submission, in the order they were given."""
    query = select(Job).where(Job.submission_id == submission_id).order_by(Job.id)
    return list(session.scalars(query))


def get_job(session: Session, job_id: str, *, owner: str | None = None) -> Job:
    """The job, if it exists and ``owner`` (None: anyone) may see it."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFoundError(job_id)
    return job


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None,
    limit: int,
    after: str | None,
    owner: str | None = None,
    batch_id: str | None = None,
) -> tuple[list[Job], bool]:
    """Jobs newest first; ``after`` is the last id of the previous page."""
    query = select(Job).order_by(Job.id.desc()).limit(limit + 1)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        query = query.where(Job.id < after)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit
