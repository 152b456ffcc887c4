"""The job state machine: every change of a job's status, each one conditional UPDATE.

Each function here moves jobs between statuses with a single
``UPDATE job SET status = :to WHERE id ... AND status IN (:from) [AND lease_token = :token]``
and says whether (or for which jobs) it happened; a transition into a final status
writes that job's webhook outbox row in the same transaction, keyed by (job,
event) so that recording it twice still makes one event. Nothing else in genq
assigns a status. Two racing transitions therefore cannot both win: on
PostgreSQL the second UPDATE waits for the first to commit and then re-checks its
WHERE against the new row, so it matches nothing and reports that it lost.

Delivery through a broker is at-least-once; the lease token makes it
exactly-once in SQL. A claim moves a queued job to running with a fresh token;
a worker's later writes are conditional on it, so a stale or duplicate delivery
can neither overwrite a result nor count it twice.

The functions take a session and ids and leave the commit to the caller, so a
test can drive them directly, from several connections at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from core import tally, webhooks
from core.errors import ConflictError, NotFoundError
from core.locking import in_id_order, lock_in_order, locked_by_id
from core.models import Job, utcnow
from core.queue import Route
from core.schemas import GenerationParams
from core.status import TRANSITIONS, JobStatus, sources

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
TOO_MANY_ATTEMPTS = "too_many_attempts"
CANCELLED_REASON = "cancelled"  # the finish reason of a cancelled job's partial output

# The source statuses of each transition, checked against core.status.TRANSITIONS.
_CLAIM_FROM = sources(TRANSITIONS, RUNNING, QUEUED)
_STORE_FROM = sources(TRANSITIONS, SUCCEEDED, RUNNING)
_FAIL_FROM = sources(TRANSITIONS, FAILED, RUNNING)
_EXHAUST_FROM = sources(TRANSITIONS, FAILED, QUEUED)
_LAPSED_FROM = sources(TRANSITIONS, FAILED, RUNNING)
_RELEASE_FROM = sources(TRANSITIONS, QUEUED, RUNNING)
_CANCEL_FROM = sources(TRANSITIONS, CANCELLED, QUEUED, RUNNING)


class JobNotFoundError(NotFoundError):
    """No job with that id (or not visible to the caller)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}", param="id")
        self.job_id = job_id


class JobConflictError(ConflictError):
    """The job is in a status that does not allow the operation."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """A worker's hold on one attempt of a job."""

    job_id: str
    attempt: int
    token: str
    prompt: str
    model: str
    params: GenerationParams
    seed: int
    priority: str = "normal"
    messages: list[dict[str, str]] | None = None  # a chat job's, to render


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a generation produced, as stored on the job.

    ``aborted``: the engine stopped it early. Such an output is only ever kept on
    a job cancelled meanwhile; it never makes a job ``succeeded``.
    """

    outputs: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    model_revision: str
    torch_version: str
    transformers_version: str
    dtype: str | None = None  # the weights' dtype: bf16 tokens can differ from fp32's
    products: str | None = None  # the matrix products' kernels (ModelInfo.products)
    aborted: bool = False
    logprobs: list[list[dict[str, Any]]] | None = None
    prompt: str | None = None  # a chat job's rendered prompt (None: keep the stored one)


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a generation failed, as stored on the job."""

    code: str
    message: str


_OUTCOME_COLUMNS = [
    f.name for f in dataclasses.fields(Outcome) if f.name not in ("aborted", "prompt")
]
_CLAIMED = (
    Job.id,
    Job.attempts,
    Job.prompt,
    Job.model,
    Job.params,
    Job.seed,
    Job.priority,
    Job.messages,
)


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count


# --- queued -> running ----------------------------------------------------------------


def _claim(row: Any, token: str) -> Claim:
    job_id, attempt, prompt, model, params, seed, priority, messages = row
    return Claim(
        job_id=job_id,
        attempt=attempt,
        token=token,
        prompt=prompt,
        model=model,
        params=GenerationParams.model_validate(params),
        seed=seed,
        priority=priority,
        messages=messages,
    )


def _claiming(worker: str, token: str, lease_s: float) -> dict[str, Any]:
    now = utcnow()
    return {
        "status": RUNNING,
        "attempts": Job.attempts + 1,
        "worker": worker,
        "lease_token": token,
        "lease_expires_at": now + dt.timedelta(seconds=lease_s),
        "started_at": now,
    }


def claim_fresh(
    session: Session, job_ids: Sequence[str], *, worker: str, lease_s: float
) -> tuple[list[Claim], list[str]]:
    """Claim, in one statement, the queued jobs among ``job_ids`` never attempted
    before; returns their claims (in the order given) and the ids of the queued
    ones that were attempted before (suspects, to be claimed one by one with
    :func:`claim_job`). Ids not queued are neither (skipped).

    The claims share one lease token: each write is conditional on the job id
    and the token, so it still identifies this attempt of each job.
    """
    token = secrets.token_hex(16)
    # The rows are found by id alone and locked in id order (core.locking), and
    # their status checked once locked: never ix_job_status's queued entries.
    locked = locked_by_id(set(job_ids), Job.status, Job.attempts)
    table = cast(Table, Job.__table__)  # Core: the ORM's update path costs more than it
    rows = (
        session.connection()
        .execute(
            update(table)
            .where(
                table.c.id.in_(
                    select(locked.c.id).where(
                        locked.c.status.in_(_CLAIM_FROM), locked.c.attempts == 0
                    )
                )
            )
            .values(**_claiming(worker, token, lease_s))
            .returning(*_CLAIMED)
        )
        .all()
    )
    claims = {row[0]: _claim(row, token) for row in rows}
    rest = [job_id for job_id in job_ids if job_id not in claims]
    suspects: set[str] = set()
    if rest:  # by id alone too; the few rows are sorted out here
        found = session.execute(select(Job.id, Job.status).where(Job.id.in_(rest)))
        suspects = {job_id for job_id, status in found if status == QUEUED}
    return (
        [claims[i] for i in job_ids if i in claims],
        [i for i in rest if i in suspects],
    )


def claim_job(
    session: Session, job_id: str, *, worker: str, lease_s: float, max_attempts: int
) -> Claim | None:
    """Move a queued job to running for this worker; None if it is not queued
    (cancelled before it started, already taken, finished, or unknown).

    A *queued* job that has used up its attempts is failed instead of claimed. A
    job another worker is running is left alone, whatever its attempts: this
    claim merely lost to a duplicate message.
    """
    token = secrets.token_hex(16)
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_CLAIM_FROM), Job.attempts < max_attempts)
        .values(**_claiming(worker, token, lease_s))
        .returning(*_CLAIMED)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        _fail_exhausted(session, (Job.id == job_id) & Job.status.in_(_EXHAUST_FROM), max_attempts)
        return None
    return _claim(row, token)


# --- running -> succeeded / failed / queued (the lease holder's writes) ---------------


def _owned(claim: Claim, *statuses: JobStatus) -> ColumnElement[bool]:
    return (Job.id == claim.job_id) & (Job.lease_token == claim.token) & Job.status.in_(statuses)


def store_outcomes(
    session: Session, outcomes: Sequence[tuple[Claim, Outcome | Failure]]
) -> list[bool]:
    """Store what each claimed attempt produced, in the caller's transaction.

    A complete :class:`Outcome` marks the job succeeded; a :class:`Failure` marks
    it failed. A job cancelled while it ran stays cancelled and keeps its partial
    output (finish reason ``cancelled``). Each entry of the answer is False where
    the claim was no longer ours (or an aborted output met a job not cancelled).

    Running this twice for one claim (a retry after an ambiguous commit) answers
    True again and writes no second event: the outbox row's id is derived from
    the job and its event.
    """
    # The group's rows are locked in id order first, whatever order its jobs
    # finished in: one lock order for every writer (core.locking). What they were
    # then tells which of them this call moves to a final status.
    before = lock_in_order(session, [claim.job_id for claim, _ in outcomes])
    complete = [(c, o) for c, o in outcomes if isinstance(o, Outcome) and not o.aborted]
    _set_succeeded(session, complete)
    for claim, outcome in outcomes:
        if isinstance(outcome, Failure):
            _set_failed(session, claim, outcome)
    # Where each job stands now under our claim's token: a cancel or a retried store
    # may have got there first.
    # (with what the webhook events of those that ended need, in the same read).
    ids = [claim.job_id for claim, _ in outcomes]
    tokens = {claim.token for claim, _ in outcomes}
    query = select(*webhooks.JOB_EVENT_COLUMNS).where(Job.id.in_(ids), Job.lease_token.in_(tokens))
    rows = session.execute(query).all()
    now: dict[str, JobStatus] = {row.id: row.status for row in rows}
    for claim, outcome in outcomes:
        if isinstance(outcome, Outcome) and now.get(claim.job_id) is CANCELLED:
            _keep_cancelled_output(session, claim, outcome)
    ended = [row for row in rows if row.status in (SUCCEEDED, FAILED)]
    webhooks.record_events_of(session, ended)
    tally.record_final(session, [row.id for row in ended if before.get(row.id) is RUNNING])
    return [_matches(now.get(claim.job_id), outcome) for claim, outcome in outcomes]


def _matches(status: JobStatus | None, outcome: Outcome | Failure) -> bool:
    """Whether the job now holds what this outcome leads to (a retried store finds
    its own earlier write)."""
    if isinstance(outcome, Failure):
        return status is FAILED
    return status is CANCELLED if outcome.aborted else status in (SUCCEEDED, CANCELLED)


def _set_succeeded(session: Session, items: Sequence[tuple[Claim, Outcome]]) -> None:
    """Mark the jobs succeeded with their results, as one executemany statement."""
    if not items:
        return
    table = cast(Table, Job.__table__)
    statement = (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            table.c.lease_token == bindparam("b_token"),
            table.c.status == _STORE_FROM[0],  # one source: executemany cannot expand IN
        )
        .values(
            status=SUCCEEDED,
            finished_at=utcnow(),
            lease_expires_at=None,
            **{f: bindparam(f"b_{f}", type_=table.c[f].type) for f in _OUTCOME_COLUMNS},
            prompt=func.coalesce(bindparam("b_prompt", type_=table.c.prompt.type), table.c.prompt),
        )
    )
    rows = [
        {"b_id": claim.job_id, "b_token": claim.token}
        | {f"b_{f}": getattr(outcome, f) for f in [*_OUTCOME_COLUMNS, "prompt"]}
        for claim, outcome in items
    ]
    session.connection().execute(statement, rows)


def _keep_cancelled_output(session: Session, claim: Claim, outcome: Outcome) -> None:
    """A job cancelled while it ran keeps what it generated; its finish reason says
    why it stopped. Not a transition: the cancel wrote the status and the event."""
    values = {f: getattr(outcome, f) for f in _OUTCOME_COLUMNS}
    if outcome.prompt is not None:
        values["prompt"] = outcome.prompt
    values["finish_reasons"] = [CANCELLED_REASON] * len(outcome.outputs)
    session.execute(
        update(Job)
        .where(_owned(claim, CANCELLED))
        .values(**values, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def _set_failed(session: Session, claim: Claim, failure: Failure) -> bool:
    result = session.execute(
        update(Job)
        .where(_owned(claim, *_FAIL_FROM))
        .values(
            status=FAILED,
            error_code=failure.code,
            error_message=failure.message[:4000],
            finished_at=utcnow(),
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(_rowcount(result))


def _back_to_queue() -> dict[str, Any]:
    """The values that return a running job to the queue, partial output dropped."""
    return {
        "status": QUEUED,
        "worker": None,
        "lease_token": None,
        "lease_expires_at": None,
        "outputs": None,
        "completion_tokens": None,
        "enqueued_at": utcnow(),
    }


def release_job(session: Session, claim: Claim, *, counted: bool = False) -> bool:
    """Hand a running job back to the queue (worker shutting down). The attempt
    does not count (the job did nothing wrong) unless ``counted`` (it could not run
    even alone). Partial output is dropped."""
    result = session.execute(
        update(Job)
        .where(_owned(claim, *_RELEASE_FROM))
        .values(attempts=Job.attempts - (0 if counted else 1), started_at=None, **_back_to_queue())
        .execution_options(synchronize_session=False)
    )
    return bool(_rowcount(result))


# --- queued / running -> cancelled (the owner's writes) --------------------------------


def cancel_where(session: Session, where: ColumnElement[bool]) -> list[str]:
    """Cancel the queued and running jobs matching ``where``; returns their ids. A
    running one stops within a few steps (its worker's monitor aborts it) and keeps
    what it generated."""
    ids = list(
        session.scalars(
            update(Job)
            .where(in_id_order(where & Job.status.in_(_CANCEL_FROM)))
            .values(status=CANCELLED, finished_at=utcnow(), lease_expires_at=None)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
    )
    webhooks.record_job_events(session, ids)
    tally.record_final(session, ids)
    return ids


def cancel_job(session: Session, job_id: str, *, owner: str | None = None) -> Job:
    """Cancel a queued or running job; a finished one cannot be cancelled
    (:class:`JobConflictError`), a cancelled one is answered as it is."""
    where = Job.id == job_id
    if owner is not None:
        where = where & (Job.owner == owner)
    cancel_where(session, where)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFoundError(job_id)
    if job.status is not CANCELLED:
        raise JobConflictError(f"job {job_id} already {job.status}; it cannot be cancelled")
    return job


# --- the sweeper's transitions ---------------------------------------------------------


def _fail_exhausted(session: Session, where: ColumnElement[bool], max_attempts: int) -> list[str]:
    ids = list(
        session.scalars(
            update(Job)
            .where(where, Job.attempts >= max_attempts)
            .values(
                status=FAILED,
                error_code=TOO_MANY_ATTEMPTS,
                error_message=(
                    f"the job was attempted {max_attempts} times and its worker died or "
                    "lost it each time; it is quarantined so the other jobs go on"
                ),
                finished_at=utcnow(),
                lease_expires_at=None,
                lease_token=None,  # a late result of the lost attempt is refused
            )
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
    )
    webhooks.record_job_events(session, ids)
    tally.record_final(session, ids)
    return ids


def reclaim_expired(session: Session, *, max_attempts: int) -> tuple[list[Route], list[str]]:
    """Running jobs whose lease expired (their worker died): those with attempts
    left go back to queued (returned, to be re-sent); the others fail."""
    # Rows a worker is writing right now are skipped: looked at again next sweep.
    expired = in_id_order(
        Job.status.in_(_LAPSED_FROM) & (Job.lease_expires_at < utcnow()), skip_locked=True
    )
    failed = _fail_exhausted(session, expired, max_attempts)
    requeued = session.execute(
        update(Job)
        .where(expired, Job.status.in_(_RELEASE_FROM))
        .values(**_back_to_queue())
        .returning(Job.id, Job.model, Job.priority)
        .execution_options(synchronize_session=False)
    )
    return [Route(*row) for row in requeued], failed
