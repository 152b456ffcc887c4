"""The job service: every database call about jobs lives here.

Writes by a worker are conditional on its claim (the attempt number it got when
it claimed the job), so a stale or duplicate delivery cannot overwrite a result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.models import Job, utcnow
from core.queue import JobQueue
from core.schemas import GenerationParams, JobCreate
from core.settings import Settings
from core.status import JobStatus

log = logging.getLogger(__name__)


class JobNotFoundError(LookupError):
    """No job with that id (or not visible to the caller)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class JobConflictError(Exception):
    """The job is in a status that does not allow the operation."""


class UnknownModelError(ValueError):
    """The job asks for a model no worker serves."""

    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(f"model {model!r} is not served; available: {', '.join(available)}")
        self.model = model
        self.available = list(available)


def served_models(settings: Settings) -> list[str]:
    """The models jobs may ask for."""
    return [settings.model]


def new_job_id() -> str:
    """A time-ordered id: 48 bits of milliseconds then 80 random bits, in hex.

    Sorting by id is sorting by creation time, which makes cursor pagination a
    plain ``id < after``.
    """
    millis = time.time_ns() // 1_000_000
    return f"job_{millis:012x}{secrets.token_hex(10)}"


def draw_seed() -> int:
    """A seed for a job that gave none, stored so the job can be reproduced."""
    return int.from_bytes(os.urandom(4), "big")


def create_job(
    session: Session, body: JobCreate, *, default_model: str, default_max_new_tokens: int
) -> Job:
    """Add a queued job row (not yet committed) with its parameters and seed fixed."""
    params = body.params().with_defaults(default_max_new_tokens)
    job = Job(
        id=new_job_id(),
        status=JobStatus.QUEUED.value,
        prompt=body.prompt,
        model=body.model or default_model,
        params=params.model_dump(mode="json", exclude_none=True),
        seed=params.seed if params.seed is not None else draw_seed(),
        attempts=0,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def submit_job(session: Session, queue: JobQueue, body: JobCreate, *, settings: Settings) -> Job:
    """Commit a new job, then send its id to the broker.

    The row is committed first: a job exists once its row does. If the broker
    is unreachable the job stays queued in SQL, and the sweeper re-sends it.
    """
    model = body.model or settings.model
    available = served_models(settings)
    if model not in available:
        raise UnknownModelError(model, available)
    job = create_job(
        session,
        body.model_copy(update={"model": model}),
        default_model=model,
        default_max_new_tokens=settings.default_max_new_tokens,
    )
    session.commit()
    try:
        queue.enqueue(job.id)
    except Exception:
        log.warning(
            "could not enqueue job %s; it stays queued for the sweeper", job.id, exc_info=True
        )
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def list_jobs(
    session: Session, *, status: JobStatus | None, limit: int, after: str | None
) -> tuple[list[Job], bool]:
    """Jobs newest first; ``after`` is the last id of the previous page."""
    query = select(Job).order_by(Job.id.desc()).limit(limit + 1)
    if status is not None:
        query = query.where(Job.status == status.value)
    if after is not None:
        query = query.where(Job.id < after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel a queued or running job. A running one stops within a few steps and
    keeps what it generated; a finished one cannot be cancelled."""
    job = get_job(session, job_id)
    if job.job_status.is_final:
        if job.job_status is JobStatus.CANCELLED:
            return job
        raise JobConflictError(f"job {job_id} already {job.status}; it cannot be cancelled")
    job.status = JobStatus.CANCELLED.value
    job.finished_at = utcnow()
    session.flush()
    return job


# --- the worker's side -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claim:
    """A worker's hold on one attempt of a job."""

    job_id: str
    attempt: int
    prompt: str
    model: str
    params: GenerationParams
    seed: int


def claim_job(session: Session, job_id: str, *, worker: str) -> Claim | None:
    """Move a queued job to running for this worker; None if it is not queued
    (cancelled before it started, already taken, finished, or unknown)."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=Job.attempts + 1,
            worker=worker,
            started_at=utcnow(),
        )
        .returning(Job.attempts, Job.prompt, Job.model, Job.params, Job.seed)
    ).one_or_none()
    if row is None:
        return None
    attempt, prompt, model, params, seed = row
    return Claim(
        job_id=job_id,
        attempt=attempt,
        prompt=prompt,
        model=model,
        params=GenerationParams.model_validate(params),
        seed=seed if seed is not None else draw_seed(),
    )


def _owned(claim: Claim, *statuses: JobStatus) -> Any:
    return (
        (Job.id == claim.job_id)
        & (Job.attempts == claim.attempt)
        & Job.status.in_([s.value for s in statuses])
    )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a generation produced, as stored on the job."""

    outputs: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    model_revision: str
    torch_version: str
    transformers_version: str


def finish_job(session: Session, claim: Claim, outcome: Outcome) -> bool:
    """Store the result of the claimed attempt and mark it succeeded (or keep it
    cancelled, with its partial output). False if the claim is no longer ours."""
    values = {
        "outputs": outcome.outputs,
        "finish_reasons": outcome.finish_reasons,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "model_revision": outcome.model_revision,
        "torch_version": outcome.torch_version,
        "transformers_version": outcome.transformers_version,
    }
    done = session.execute(
        update(Job)
        .where(_owned(claim, JobStatus.RUNNING))
        .values(status=JobStatus.SUCCEEDED.value, finished_at=utcnow(), **values)
    )
    if done.rowcount:  # type: ignore[attr-defined]
        return True
    kept = session.execute(update(Job).where(_owned(claim, JobStatus.CANCELLED)).values(**values))
    return bool(kept.rowcount)  # type: ignore[attr-defined]


def fail_job(session: Session, claim: Claim, *, code: str, message: str) -> bool:
    """Mark the claimed attempt failed with its error; False if no longer ours."""
    result = session.execute(
        update(Job)
        .where(_owned(claim, JobStatus.RUNNING))
        .values(
            status=JobStatus.FAILED.value,
            error_code=code,
            error_message=message[:4000],
            finished_at=utcnow(),
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_progress(session: Session, claim: Claim, *, tokens: int, text: str) -> None:
    """Store a running job's partial output (first sequence) and its token count."""
    session.execute(
        update(Job)
        .where(_owned(claim, JobStatus.RUNNING))
        .values(outputs=[text], completion_tokens=tokens)
    )


def cancelled_among(session: Session, job_ids: Iterable[str]) -> set[str]:
    """Which of these jobs have been cancelled (so their generation should stop)."""
    ids: Sequence[str] = list(job_ids)
    if not ids:
        return set()
    query = select(Job.id).where(Job.id.in_(ids), Job.status == JobStatus.CANCELLED.value)
    return set(session.scalars(query))
