"""/v1/jobs: submit, read, list and cancel jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from api.deps import (
    CallerDep,
    IdempotencyKeyHeader,
    OwnerDep,
    QueueDep,
    SessionDep,
    SettingsDep,
    may_use_high,
)
from core import jobs, jobstate, quotas, submit
from core.schemas import JobBulkCreate, JobCreate, JobList, JobRead, JobsCreated
from core.status import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobRead)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    owner: OwnerDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobRead:
    """Queue a prompt for generation; answers at once with the queued job.

    With an ``Idempotency-Key`` header, a retry with the same key and body gets
    the same job back (``Idempotent-Replayed: true``); another body gets a 409.
    """
    quotas.check_priority(may_use_high(caller), [("priority", body.priority)])
    job, replay = submit.submit_job(
        session, queue, body, settings=settings, owner=owner, idempotency_key=idempotency_key
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replay:
        response.headers["Idempotent-Replayed"] = "true"
    return jobs.view(session, job)


@router.post("/bulk", status_code=status.HTTP_202_ACCEPTED, response_model=JobsCreated)
def create_jobs(
    body: JobBulkCreate,
    response: Response,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    owner: OwnerDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobsCreated:
    """Queue many prompts at once (up to 10,000): all are accepted, or none is and
    the error names the first bad one (``jobs.3.prompt``). Answers with the queued
    jobs in the order given. Far cheaper per job than one request each; for
    millions of prompts or an OpenAI-style file, use ``/v1/batches``.

    ``Idempotency-Key`` works as for ``POST /v1/jobs``: a retry gets the same jobs.
    """
    quotas.check_priority(
        may_use_high(caller), ((f"jobs.{i}.priority", b.priority) for i, b in enumerate(body.jobs))
    )
    created, replay = submit.submit_jobs(
        session, queue, body.jobs, settings=settings, owner=owner, idempotency_key=idempotency_key
    )
    if replay:
        response.headers["Idempotent-Replayed"] = "true"
    return JobsCreated(data=jobs.views(session, created))


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
    batch_id: Annotated[str | None, Query(max_length=64)] = None,
) -> JobList:
    """Jobs newest first; pass the page's ``next_after`` as ``after`` for the next page."""
    rows, has_more = jobs.list_jobs(
        session, status=status, limit=limit, after=after, owner=owner, batch_id=batch_id
    )
    data = jobs.views(session, rows)
    return JobList(data=data, has_more=has_more, next_after=data[-1].id if has_more else None)


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobRead:
    """One job: its status, and its output (partial while it runs)."""
    return jobs.view(session, jobs.get_job(session, job_id, owner=owner))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobRead:
    """Cancel a queued or running job; a running one keeps what it generated."""
    job = jobstate.cancel_job(session, job_id, owner=owner)
    session.commit()
    return jobs.view(session, job)
