"""The worker's side of a job: claim, lease, progress, result, hand-back, and the sweep.

Delivery through a broker is at-least-once; these functions make it exactly-once
in SQL. A claim moves a queued job to running and gives it a fresh lease token;
every later write by that worker is conditional on the token, so a stale or
duplicate delivery can neither overwrite a result nor count it twice. A running
job's lease expires unless its worker renews it; the sweeper hands expired jobs
back to the queue, or fails them once they have used up their attempts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import JSON, Table, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from core import webhooks
from core.models import Job, Lock, utcnow
from core.queue import Route
from core.schemas import GenerationParams
from core.status import JobStatus

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
TOO_MANY_ATTEMPTS = "too_many_attempts"


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


def queued_attempts(session: Session, job_id: str) -> int | None:
    """How many counted attempts a queued job has had; None if it is not queued."""
    attempts: int | None = session.scalar(
        select(Job.attempts).where(Job.id == job_id, Job.status == QUEUED)
    )
    return attempts


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
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == QUEUED, Job.attempts == 0)
        .values(**_claiming(worker, token, lease_s))
        .returning(*_CLAIMED)
        .execution_options(synchronize_session=False)
    ).all()
    claims = {row[0]: _claim(row, token) for row in rows}
    rest = [job_id for job_id in job_ids if job_id not in claims]
    suspects: set[str] = set()
    if rest:
        suspects = set(
            session.scalars(select(Job.id).where(Job.id.in_(rest), Job.status == QUEUED))
        )
    return (
        [claims[i] for i in job_ids if i in claims],
        [i for i in rest if i in suspects],
    )


def claim_job(
    session: Session, job_id: str, *, worker: str, lease_s: float, max_attempts: int
) -> Claim | None:
    """Move a queued job to running for this worker; None if it is not queued
    (cancelled before it started, already taken, finished, or unknown).

    A job that has used up its attempts is failed instead of claimed.
    """
    token = secrets.token_hex(16)
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.attempts < max_attempts)
        .values(**_claiming(worker, token, lease_s))
        .returning(*_CLAIMED)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        _fail_exhausted(session, Job.id == job_id, max_attempts)
        return None
    return _claim(row, token)


def _owned(claim: Claim, *statuses: JobStatus) -> Any:
    return (
        (Job.id == claim.job_id)
        & (Job.lease_token == claim.token)
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
    logprobs: list[list[dict[str, Any]]] | None = None
    prompt: str | None = None  # a chat job's rendered prompt (None: keep the stored one)


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a generation failed, as stored on the job."""

    code: str
    message: str


def store_outcomes(
    session: Session, outcomes: Sequence[tuple[Claim, Outcome | Failure]]
) -> list[bool]:
    """Store what each claimed attempt produced, in the caller's transaction.

    An :class:`Outcome` marks the job succeeded (or, if it was cancelled while it
    ran, keeps it cancelled with its partial output); a :class:`Failure` marks it
    failed. Jobs that reached a final status here get their webhook events. Each
    entry of the answer is False where the claim was no longer ours.
    """
    successes = [(c, o) for c, o in outcomes if isinstance(o, Outcome)]
    done, kept = _set_succeeded(session, successes)
    for claim, outcome in outcomes:
        if isinstance(outcome, Failure) and _set_failed(session, claim, outcome):
            done.add(claim.job_id)
    webhooks.record_job_events(session, [c.job_id for c, _ in outcomes if c.job_id in done])
    return [claim.job_id in done or claim.job_id in kept for claim, _ in outcomes]


_OUTCOME_FIELDS = [field.name for field in dataclasses.fields(Outcome) if field.name != "prompt"]


def _set_succeeded(
    session: Session, items: Sequence[tuple[Claim, Outcome]]
) -> tuple[set[str], set[str]]:
    """Mark the jobs succeeded with their results, as one executemany statement;
    returns the ids that succeeded now, and those kept cancelled (cancelled while
    they ran: their output is stored, their webhook was written by the cancel)."""
    if not items:
        return set(), set()
    table = cast(Table, Job.__table__)
    statement = (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            table.c.lease_token == bindparam("b_token"),
            table.c.status == RUNNING,
        )
        .values(
            status=JobStatus.SUCCEEDED.value,
            finished_at=utcnow(),
            lease_expires_at=None,
            **{f: bindparam(f"b_{f}", type_=table.c[f].type) for f in _OUTCOME_FIELDS},
            prompt=func.coalesce(bindparam("b_prompt", type_=table.c.prompt.type), table.c.prompt),
        )
    )
    rows = [
        {"b_id": claim.job_id, "b_token": claim.token}
        | {f"b_{f}": getattr(outcome, f) for f in [*_OUTCOME_FIELDS, "prompt"]}
        for claim, outcome in items
    ]
    session.connection().execute(statement, rows)
    now = dict(
        session.execute(
            select(Job.id, Job.status).where(
                Job.id.in_([claim.job_id for claim, _ in items]),
                Job.lease_token.in_({claim.token for claim, _ in items}),
            )
        ).all()
    )
    done = {claim.job_id for claim, _ in items if now.get(claim.job_id) == JobStatus.SUCCEEDED}
    kept = set()
    for claim, outcome in items:
        if now.get(claim.job_id) == JobStatus.CANCELLED.value:
            values = {f: getattr(outcome, f) for f in _OUTCOME_FIELDS} | {"lease_expires_at": None}
            if outcome.prompt is not None:
                values["prompt"] = outcome.prompt
            session.execute(
                update(Job)
                .where(_owned(claim, JobStatus.CANCELLED))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            kept.add(claim.job_id)
    return done, kept


def _set_failed(session: Session, claim: Claim, failure: Failure) -> bool:
    result = session.execute(
        update(Job)
        .where(_owned(claim, JobStatus.RUNNING))
        .values(
            status=JobStatus.FAILED.value,
            error_code=failure.code,
            error_message=failure.message[:4000],
            finished_at=utcnow(),
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(_rowcount(result))


def finish_job(session: Session, claim: Claim, outcome: Outcome) -> bool:
    """Store one claimed attempt's result (see :func:`store_outcomes`)."""
    return store_outcomes(session, [(claim, outcome)])[0]


def fail_job(session: Session, claim: Claim, *, code: str, message: str) -> bool:
    """Mark one claimed attempt failed with its error; False if no longer ours."""
    return store_outcomes(session, [(claim, Failure(code, message))])[0]


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


def release_job(session: Session, claim: Claim) -> bool:
    """Hand a running job back to the queue (worker shutting down). The attempt
    does not count: the job did nothing wrong. Partial output is dropped."""
    result = session.execute(
        update(Job)
        .where(_owned(claim, JobStatus.RUNNING))
        .values(attempts=Job.attempts - 1, started_at=None, **_back_to_queue())
    )
    return bool(_rowcount(result))


def record_progress(session: Session, updates: Iterable[tuple[Claim, int, str]]) -> None:
    """Store running jobs' partial output (first sequence) and token counts, as
    one executemany statement for all of them (``(claim, tokens, text)`` each)."""
    rows = [
        {"b_id": claim.job_id, "b_token": claim.token, "b_outputs": [text], "b_tokens": tokens}
        for claim, tokens, text in updates
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
        .values(outputs=bindparam("b_outputs", type_=JSON), completion_tokens=bindparam("b_tokens"))
        .execution_options(synchronize_session=False)
    )
    session.connection().execute(statement, rows)


def renew_leases(session: Session, claims: Iterable[Claim], *, lease_s: float) -> None:
    """Extend the leases of the jobs this worker holds."""
    tokens = sorted({c.token for c in claims})  # a group's claims share a token
    if tokens:
        session.execute(
            update(Job)
            .where(Job.lease_token.in_(tokens), Job.status == RUNNING)
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
        )


def cancelled_among(session: Session, job_ids: Iterable[str]) -> set[str]:
    """Which of these jobs have been cancelled (so their generation should stop)."""
    ids: Sequence[str] = list(job_ids)
    if not ids:
        return set()
    query = select(Job.id).where(Job.id.in_(ids), Job.status == JobStatus.CANCELLED.value)
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


def _fail_exhausted(session: Session, where: Any, max_attempts: int) -> list[str]:
    rows = session.execute(
        update(Job)
        .where(where, Job.status.in_([QUEUED, RUNNING]), Job.attempts >= max_attempts)
        .values(
            status=JobStatus.FAILED.value,
            error_code=TOO_MANY_ATTEMPTS,
            error_message=(
                f"the job was attempted {max_attempts} times and its worker died or "
                "lost it each time; it is quarantined so the other jobs go on"
            ),
            finished_at=utcnow(),
            lease_expires_at=None,
        )
        .returning(Job.id)
    )
    failed = list(rows.scalars())
    webhooks.record_job_events(session, failed)
    return failed


def reclaim_expired(session: Session, *, max_attempts: int) -> tuple[list[Route], list[str]]:
    """Running jobs whose lease expired (their worker died): those with attempts
    left go back to queued (returned, to be re-sent); the others fail."""
    now = utcnow()
    expired = (Job.status == RUNNING) & (Job.lease_expires_at < now)
    failed = _fail_exhausted(session, expired, max_attempts)
    requeued = session.execute(
        update(Job)
        .where(expired)
        .values(**_back_to_queue())
        .returning(Job.id, Job.model, Job.priority)
    )
    return [Route(*row) for row in requeued], failed


def queued_counts(session: Session) -> dict[tuple[str, str], int]:
    """Queued jobs per (model, priority): what each queue should hold."""
    rows = session.execute(
        select(Job.model, Job.priority, func.count())
        .where(Job.status == QUEUED)
        .group_by(Job.model, Job.priority)
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
            select(Job.id)
            .where(
                Job.status == QUEUED,
                Job.model == model,
                Job.priority == priority,
                (Job.enqueued_at < cutoff) | Job.enqueued_at.is_(None),
            )
            .order_by(Job.id)
            .limit(limit)
        )
    )
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=utcnow()))
    return [Route(job_id, model, priority) for job_id in ids]


def purge_finished(session: Session, *, older_than_days: float) -> int:
    """Delete finished jobs older than the retention age; returns how many."""
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    final = [s.value for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)]
    result = session.execute(delete(Job).where(Job.status.in_(final), Job.finished_at < cutoff))
    return _rowcount(result)


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count
