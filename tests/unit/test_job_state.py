"""The job and batch state machines (core/jobstate.py, core/batches/lifecycle.py):
each transition is one conditional UPDATE, so racing transitions cannot both win,
and one transition is one event.

The races run the real functions on two real PostgreSQL connections, each in its
own transaction: the second UPDATE blocks on the first's row lock, and the test
waits until PostgreSQL reports it waiting before letting the first commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from core import batches, jobstate, submit, webhooks
from core.db import get_sessionmaker, session_scope
from core.models import Job, WebhookDelivery
from core.openai_format import ParsedRequest
from core.schemas import GenerationParams, JobCreate
from core.status import TRANSITIONS, BatchStatus, JobStatus, sources

HOOK = "http://hooks.test/genq"
OUTCOME = jobstate.Outcome(
    outputs=[" a b c"],
    finish_reasons=["length"],
    prompt_tokens=2,
    completion_tokens=3,
    model_revision="r",
    torch_version="t",
    transformers_version="tf",
)


def queued_job(url: str, *, attempts: int = 0) -> str:
    """A committed queued job with a callback (so its final status has an event)."""
    with session_scope(url) as session:
        body = JobCreate.model_validate({"prompt": "one two", "callback_url": HOOK})
        new = submit.NewJob.from_create(body, default_model="fake")
        job_id = submit.new_job_id()
        row = submit.job_row(new, job_id=job_id, owner="local", default_max_new_tokens=4)
        session.execute(insert(Job), [row])
    if attempts:
        with get_sessionmaker(url)() as session:  # a test's setup, not a transition
            session.execute(
                text("UPDATE job SET attempts = :n WHERE id = :id"), {"n": attempts, "id": job_id}
            )
            session.commit()
    return job_id


def claimed(url: str, job_id: str, worker: str = "w1", max_attempts: int = 3) -> jobstate.Claim:
    with session_scope(url) as session:
        claim = jobstate.claim_job(
            session, job_id, worker=worker, lease_s=60, max_attempts=max_attempts
        )
    assert claim is not None
    return claim


def events(url: str, job_id: str) -> list[tuple[str, str]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(WebhookDelivery.id, WebhookDelivery.event).where(
                WebhookDelivery.job_id == job_id
            )
        )
        return [(row.id, row.event) for row in rows]


def status(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def wait_until_blocked(url: str, timeout_s: float = 30) -> None:
    """Return once some other connection to this database waits on a lock."""
    deadline = time.monotonic() + timeout_s
    with get_sessionmaker(url)() as session:
        while time.monotonic() < deadline:
            waiting = session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
            session.rollback()  # a fresh snapshot of pg_stat_activity each time
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("the second transaction never waited on the first")


def race(url: str, first: Callable[[Session], Any], second: Callable[[Session], Any]) -> Any:
    """Run ``first`` in an open transaction, start ``second`` on another connection
    (it blocks on the row), commit ``first``, and return what ``second`` gave."""
    outcome: dict[str, Any] = {}

    def run_second() -> None:
        try:
            with session_scope(url) as other:
                outcome["value"] = second(other)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    with get_sessionmaker(url)() as session:
        outcome["first"] = first(session)
        thread = threading.Thread(target=run_second)
        thread.start()
        wait_until_blocked(url)
        session.commit()
    thread.join(timeout=30)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def pg(postgres_url: str) -> Iterator[str]:
    yield postgres_url


def test_a_cancel_waiting_on_a_store_finds_the_job_succeeded(pg: str) -> None:
    job_id = queued_job(pg)
    claim = claimed(pg, job_id)

    def cancel(session: Session) -> str:
        try:
            jobstate.cancel_job(session, job_id)
        except jobstate.JobConflictError as exc:
            return str(exc)
        return "cancelled"

    answer = race(pg, lambda s: jobstate.store_outcomes(s, [(claim, OUTCOME)]), cancel)
    assert "already succeeded" in answer
    assert status(pg, job_id).status == JobStatus.SUCCEEDED
    assert [event for _, event in events(pg, job_id)] == ["job.succeeded"]


def test_a_store_waiting_on_a_cancel_keeps_the_job_cancelled_with_its_output(pg: str) -> None:
    job_id = queued_job(pg)
    claim = claimed(pg, job_id)
    stored = race(
        pg,
        lambda s: jobstate.cancel_job(s, job_id),
        lambda s: jobstate.store_outcomes(s, [(claim, OUTCOME)]),
    )
    assert stored == [True]  # the output is kept on the cancelled job
    job = status(pg, job_id)
    assert job.status == JobStatus.CANCELLED
    assert job.outputs == OUTCOME.outputs and job.finish_reasons == ["cancelled"]
    assert [event for _, event in events(pg, job_id)] == ["job.cancelled"]


def test_two_cancels_racing_write_one_event(pg: str) -> None:
    job_id = queued_job(pg)
    race(pg, lambda s: jobstate.cancel_job(s, job_id), lambda s: jobstate.cancel_job(s, job_id))
    assert [event for _, event in events(pg, job_id)] == ["job.cancelled"]


def test_a_failed_claim_never_fails_a_job_another_worker_runs(database_url: str) -> None:
    # Two messages list one suspect job at attempts = max - 1: B claims it, then A's
    # claim must lose quietly, not quarantine B's running job.
    job_id = queued_job(database_url, attempts=2)
    claim_b = claimed(database_url, job_id, worker="B", max_attempts=3)
    with session_scope(database_url) as session:
        assert jobstate.claim_job(session, job_id, worker="A", lease_s=60, max_attempts=3) is None
    job = status(database_url, job_id)
    assert job.status == JobStatus.RUNNING and job.worker == "B" and job.error_code is None
    with session_scope(database_url) as session:
        assert jobstate.store_outcomes(session, [(claim_b, OUTCOME)]) == [True]
    assert status(database_url, job_id).status == JobStatus.SUCCEEDED
    assert [event for _, event in events(database_url, job_id)] == ["job.succeeded"]


def test_a_queued_job_out_of_attempts_is_failed_by_its_claim(database_url: str) -> None:
    job_id = queued_job(database_url, attempts=3)
    with session_scope(database_url) as session:
        assert jobstate.claim_job(session, job_id, worker="A", lease_s=60, max_attempts=3) is None
    job = status(database_url, job_id)
    assert job.status == JobStatus.FAILED and job.error_code == jobstate.TOO_MANY_ATTEMPTS
    assert [event for _, event in events(database_url, job_id)] == ["job.failed"]


@pytest.mark.parametrize(
    "outcome", [OUTCOME, jobstate.Failure("prompt_too_long", "x")], ids=["success", "failure"]
)
def test_a_retried_store_writes_one_event(
    database_url: str, outcome: jobstate.Outcome | jobstate.Failure
) -> None:
    # The first commit went through but its answer was lost; the retry runs the
    # same store again in a new transaction.
    job_id = queued_job(database_url)
    claim = claimed(database_url, job_id)
    for _ in range(2):
        with session_scope(database_url) as session:
            assert jobstate.store_outcomes(session, [(claim, outcome)]) == [True]
    final = "job.succeeded" if isinstance(outcome, jobstate.Outcome) else "job.failed"
    [(delivery_id, event)] = events(database_url, job_id)
    assert event == final
    assert delivery_id == webhooks.delivery_id(job_id, final)


def test_an_aborted_output_never_makes_a_job_succeeded(database_url: str) -> None:
    job_id = queued_job(database_url)
    claim = claimed(database_url, job_id)
    aborted = jobstate.Outcome(**{**OUTCOME.__dict__, "aborted": True})
    with session_scope(database_url) as session:
        assert jobstate.store_outcomes(session, [(claim, aborted)]) == [False]
    assert status(database_url, job_id).status == JobStatus.RUNNING
    assert events(database_url, job_id) == []


# --- batches (core/batches/lifecycle.py) -----------------------------------------------


def done_batch(url: str) -> str:
    """A committed in_progress batch whose only job is final, ready to finalize."""
    request = ParsedRequest(None, "one two", "fake", GenerationParams(max_new_tokens=2))
    with get_sessionmaker(url)() as session:
        batch = batches.create_batch(
            session,
            owner="local",
            input_file_id=None,
            parsed=[(1, request)],
            completion_window=None,
            models=["fake"],
            max_lines=10,
            callback_url=HOOK,
        )
        jobstate.cancel_where(session, Job.batch_id == batch.id)
        session.commit()
        return batch.id


def batch_events(url: str, batch_id: str) -> list[str]:
    with session_scope(url) as session:
        query = select(WebhookDelivery.event).where(WebhookDelivery.batch_id == batch_id)
        return list(session.scalars(query))


def test_a_cancel_waiting_on_a_finalizer_finds_the_batch_completed(pg: str) -> None:
    batch_id = done_batch(pg)

    def finalize(session: Session) -> bool:
        return batches.finalize(session, batches.get_batch(session, batch_id, owner=None))

    def cancel(session: Session) -> str:
        try:
            batches.cancel_batch(session, batch_id, owner=None)
        except batches.BatchConflictError as exc:
            return str(exc)
        return "cancelling"

    assert "already completed" in race(pg, finalize, cancel)
    with session_scope(pg) as session:
        assert batches.get_batch(session, batch_id, owner=None).status == BatchStatus.COMPLETED
    assert batch_events(pg, batch_id) == ["batch.completed"]


def test_two_finalizers_racing_finalize_once(pg: str) -> None:
    batch_id = done_batch(pg)

    def finalize(session: Session) -> bool:
        return batches.finalize(session, batches.get_batch(session, batch_id, owner=None))

    assert race(pg, finalize, finalize) is False
    assert batch_events(pg, batch_id) == ["batch.completed"]


def test_a_transition_the_rules_forbid_cannot_be_declared() -> None:
    with pytest.raises(ValueError, match="succeeded -> queued"):
        sources(TRANSITIONS, JobStatus.QUEUED, JobStatus.SUCCEEDED)
