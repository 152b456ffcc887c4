"""The job service: every database call about jobs lives here.

Writes by a worker are conditional on its claim (the attempt number it got when
it claimed the job), so a stale or duplicate delivery cannot overwrite a result.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import idempotency, workers
from core.jobstate import JobNotFoundError
from core.models import LOCAL_OWNER, Job, utcnow
from core.queue import JobQueue, Route
from core.schemas import JobCreate
from core.settings import Settings, model_id
from core.status import JobStatus

log = logging.getLogger(__name__)


class UnknownModelError(ValueError):
    """The job asks for a model no worker serves."""

    def __init__(self, model: str, available: Sequence[str], *, param: str = "model") -> None:
        super().__init__(f"model {model!r} is not served; available: {', '.join(available)}")
        self.model = model
        self.available = list(available)
        self.param = param  # the request field that named it


class RequestTooLargeError(ValueError):
    """The job needs more of a worker's cache than a worker has: it could never run."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param  # the request field that asks for too much


def served_models(session: Session, settings: Settings, *, fresh: bool = False) -> list[str]:
    """The models jobs may ask for: the configured ones and those live workers serve
    (as seen up to two seconds ago, unless ``fresh``)."""
    within_s = settings.worker_heartbeat_s * 3
    if fresh:
        live = workers.live_models(session, within_s=within_s)
    else:
        live = workers.live_models_cached(session, within_s=within_s)
    return sorted({*map(model_id, settings.models), settings.model_id, *live})


def new_job_id() -> str:
    """A time-ordered id: 48 bits of milliseconds then 80 random bits, in hex.

    Sorting by id is sorting by creation time, which makes cursor pagination a
    plain ``id < after``.
    """
    millis = time.time_ns() // 1_000_000
    return f"job_{millis:012x}{secrets.token_hex(10)}"


def new_job_ids(count: int) -> list[str]:
    """``count`` ids for jobs submitted together: like :func:`new_job_id`, but the
    random part is 32 bits shared by the group and then a counter, so they also
    sort in submission order."""
    millis = time.time_ns() // 1_000_000
    group = secrets.token_hex(4)
    return [f"job_{millis:012x}{group}{index:012x}" for index in range(count)]


def draw_seed() -> int:
    """A seed for a job that gave none, stored so the job can be reproduced."""
    return int.from_bytes(os.urandom(4), "big")


def job_values(
    body: JobCreate,
    *,
    default_model: str,
    default_max_new_tokens: int,
    owner: str | None = None,
    job_id: str | None = None,
    submission_id: str | None = None,
) -> dict[str, Any]:
    """The row of a queued job, with its parameters and seed fixed."""
    params = body.params().with_defaults(default_max_new_tokens)
    now = utcnow()
    return {
        "id": job_id or new_job_id(),
        "status": JobStatus.QUEUED,
        "prompt": body.prompt,
        "model": body.model or default_model,
        "params": params.model_dump(mode="json", exclude_none=True),
        "seed": params.seed if params.seed is not None else draw_seed(),
        "owner": owner or LOCAL_OWNER,
        "priority": body.priority,
        "callback_url": str(body.callback_url) if body.callback_url else None,
        "submission_id": submission_id,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": now,
    }


def create_job(
    session: Session,
    body: JobCreate,
    *,
    default_model: str,
    default_max_new_tokens: int,
    owner: str | None = None,
) -> Job:
    """Add a queued job row (not yet committed) with its parameters and seed fixed."""
    job = Job(
        **job_values(
            body,
            default_model=default_model,
            default_max_new_tokens=default_max_new_tokens,
            owner=owner,
        )
    )
    session.add(job)
    session.flush()
    return job


def _check_models(
    session: Session, settings: Settings, models: Sequence[str], *, param: Callable[[int], str]
) -> None:
    """Raise UnknownModelError for the first of ``models`` that is not served."""
    available = served_models(session, settings)
    if not set(models) <= set(available):
        available = served_models(session, settings, fresh=True)  # a worker just started?
    for index, model in enumerate(models):
        if model not in available:
            raise UnknownModelError(model, available, param=param(index))


def _check_fits(
    settings: Settings, bodies: Sequence[JobCreate], *, prefix: Callable[[int], str]
) -> None:
    """Raise RequestTooLargeError for the first job that needs more rows or cache tokens
    than ``max_batch_size`` / ``max_tokens_in_flight`` allow: a lower bound, as the API
    does not tokenize (each row holds at least one prompt token plus its new tokens)."""
    for index, body in enumerate(bodies):
        params = body.params().with_defaults(settings.default_max_new_tokens)
        field = "num_beams" if params.uses_beams else "num_return_sequences"
        rows = params.num_beams if params.uses_beams else params.num_return_sequences
        if rows > settings.max_batch_size:
            message = f"{field}={rows} needs {rows} rows; a worker holds {settings.max_batch_size}"
            raise RequestTooLargeError(message, param=prefix(index) + field)
        if params.max_new_tokens is not None:
            field, per_row = "max_new_tokens", params.max_new_tokens + 1
        else:
            field, per_row = "max_length", params.max_length or 0
        if rows * per_row > settings.max_tokens_in_flight:
            message = (
                f"{field} over {rows} rows needs at least {rows * per_row} tokens of cache;"
                f" a worker holds {settings.max_tokens_in_flight} (max_tokens_in_flight)"
            )
            raise RequestTooLargeError(message, param=prefix(index) + field)


def submit_job(
    session: Session,
    queue: JobQueue,
    body: JobCreate,
    *,
    settings: Settings,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Commit a new job, then send its id to the broker; returns it and whether it
    is a replay (an earlier request with the same idempotency key made it).

    The row is committed first: a job exists once its row does. If the broker
    is unreachable the job stays queued in SQL, and the sweeper re-sends it.
    """
    replay = idempotency.IdempotentRequest.begin(
        session,
        owner=owner or LOCAL_OWNER,
        key=idempotency_key,
        endpoint="jobs",
        body=body.model_dump(mode="json", exclude_unset=True),
    )
    if replay is not None and (earlier := replay.earlier()) is not None:
        return get_job(session, earlier), True
    model = model_id(body.model) if body.model else settings.model_id
    _check_models(session, settings, [model], param=lambda _: "model")
    _check_fits(settings, [body], prefix=lambda _: "")
    job = create_job(
        session,
        body.model_copy(update={"model": model}),
        default_model=model,
        default_max_new_tokens=settings.default_max_new_tokens,
        owner=owner,
    )
    if replay is not None:
        replay.remember(job.id)
    try:
        session.commit()
    except IntegrityError:
        # The same key raced in from a concurrent retry and won: answer with its job.
        session.rollback()
        if replay is None or (earlier := replay.earlier()) is None:
            raise
        return get_job(session, earlier), True
    try:
        queue.enqueue(job.id, model=job.model, priority=job.priority)
    except Exception:
        log.warning(
            "could not enqueue job %s; it stays queued for the sweeper", job.id, exc_info=True
        )
    return job, False


def submit_jobs(
    session: Session,
    queue: JobQueue,
    bodies: Sequence[JobCreate],
    *,
    settings: Settings,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[list[Job], bool]:
    """Commit many jobs in one transaction (all or none), then send them a few per
    message; returns them in the order given and whether this is a replay.

    Their ids sort in the order given. If the broker is unreachable they stay
    queued in SQL, and the sweeper re-sends them.
    """
    replay = idempotency.IdempotentRequest.begin(
        session,
        owner=owner or LOCAL_OWNER,
        key=idempotency_key,
        endpoint="jobs.bulk",
        body=[body.model_dump(mode="json", exclude_unset=True) for body in bodies],
    )
    if replay is not None and (earlier := replay.earlier()) is not None:
        return submission_jobs(session, earlier), True
    models = [model_id(body.model) if body.model else settings.model_id for body in bodies]
    _check_models(session, settings, models, param=lambda index: f"jobs.{index}.model")
    _check_fits(settings, bodies, prefix=lambda index: f"jobs.{index}.")
    submission_id = f"sub_{secrets.token_hex(12)}"
    rows = [
        job_values(
            body,
            default_model=model,
            default_max_new_tokens=settings.default_max_new_tokens,
            owner=owner,
            job_id=job_id,
            submission_id=submission_id,
        )
        for job_id, body, model in zip(new_job_ids(len(bodies)), bodies, models, strict=True)
    ]
    session.execute(insert(Job), rows)  # one multi-row INSERT, not one ORM object each
    if replay is not None:
        replay.remember(submission_id)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # the same key raced in from a concurrent retry and won
        if replay is None or (earlier := replay.earlier()) is None:
            raise
        return submission_jobs(session, earlier), True
    try:
        queue.enqueue_many([Route(row["id"], row["model"], row["priority"]) for row in rows])
    except Exception:
        log.warning(
            "could not enqueue %d jobs; they stay queued for the sweeper", len(rows), exc_info=True
        )
    return [Job(**row) for row in rows], False


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
