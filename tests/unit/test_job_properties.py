"""The job state machine under random histories: a hypothesis stateful test on a real
PostgreSQL database, driving the real core functions (no mocks of the database).

Rules: submit (one by one or in bulk), a worker taking a message (or a duplicate
of one: the message stays in the broker), storing results (complete, stopped,
aborted, failed; several at once, as a group finishing together), storing again
(a retry after an ambiguous commit), renewing leases, writing progress, handing a
job back (shutdown), cancelling, a worker dying, and time passing, with the real
sweeper running once per sweep interval. Time is a fake clock, so leases lapse
without waiting.

After every step:

- a final status never changes;
- a job has exactly one terminal event (outbox row), and only once final;
- ``succeeded`` implies an output whose token count matches its finish reason;
- attempts never exceed the limit;
- no job stays ``running`` past its lease plus a sweep;
- a claim whose lease its worker kept current is never taken from it;
- a write with a stale lease token is refused and changes nothing.

At the end, a fresh worker drains the queue: every job reaches a final status.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from core import express, models, submit
from core.db import get_sessionmaker, session_scope
from core.delivery import record_progress, renew_leases
from core.jobstate import (
    Claim,
    Failure,
    JobConflictError,
    Outcome,
    cancel_job,
    claim_fresh,
    claim_job,
    release_job,
    store_outcomes,
)
from core.models import Job, WebhookDelivery
from core.quotas import RateLimiter
from core.schemas import JobCreate
from core.settings import Settings
from tests.conftest import RecordingQueue
from worker.sweeper import Sweeper

MAX_ATTEMPTS = 2
LEASE_S = 3.0
SWEEP_S = 1.0
REQUEUE_AFTER_S = 2.0
CALLBACK = "https://hooks.example.com/genq"  # recorded in the outbox, never sent here
FINAL = frozenset({"succeeded", "failed", "cancelled"})
KINDS = ("length", "stop", "aborted", "failed")


class Clock:
    """The time every core function sees (``utcnow``), moved by the test."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclasses.dataclass
class Held:
    """A claim in a worker's memory and when its lease ends as far as it knows."""

    claim: Claim
    lease_until: dt.datetime


@dataclasses.dataclass
class Worker:
    name: str
    held: list[Held] = dataclasses.field(default_factory=list)
    suspects: list[str] = dataclasses.field(default_factory=list)  # to claim one by one


def outcome(kind: str, max_new: int, cut: int) -> Outcome | Failure:
    """What an engine reports: ``length`` made every token, ``stop`` ended early on
    a stop string, ``aborted`` was stopped (time limit, cancel) with fewer tokens
    and, as the engines report it, finish reason ``length``."""
    if kind == "failed":
        return Failure("internal_error", "the engine failed")
    tokens = max_new if kind == "length" else cut % max_new
    return Outcome(
        outputs=[" w" * tokens],
        finish_reasons=["stop" if kind == "stop" else "length"],
        prompt_tokens=2,
        completion_tokens=tokens,
        model_revision="fake",
        torch_version="none",
        transformers_version="none",
        aborted=kind == "aborted",
    )


class JobMachine(RuleBasedStateMachine):
    """One random history of a few jobs and three workers."""

    url: ClassVar[str]
    settings: ClassVar[Settings]
    clock: ClassVar[Clock]

    def __init__(self) -> None:
        super().__init__()
        # Each history starts from an empty database at the present time, so that
        # the sweeper acts on this history's jobs only (and a replay replays).
        with session_scope(self.url) as session:
            for table in reversed(models.Base.metadata.sorted_tables):
                session.execute(table.delete())
        self.clock.now = dt.datetime.now(dt.UTC)
        self.queue = RecordingQueue()
        self.broker = self.queue.messages  # what is sent and not yet taken
        self.sweeper = Sweeper(self.settings, self.queue, holder="sweeper-under-test")
        self.max_new: dict[str, int] = {}
        self.seen: dict[str, str] = {}
        self.stored: list[tuple[Claim, Outcome | Failure]] = []
        self.workers = [self._fresh_worker() for _ in range(3)]
        self.last_sweep = self.clock()

    def _fresh_worker(self) -> Worker:
        return Worker(f"worker-{secrets.token_hex(3)}")

    def _unfinished(self) -> list[str]:
        with session_scope(self.url) as session:
            query = select(Job.id).where(Job.id.in_(self.max_new), Job.status.not_in(FINAL))
            return list(session.scalars(query))

    def _row(self, job_id: str) -> Job:
        with session_scope(self.url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    # --- the API's side --------------------------------------------------------

    @rule(count=st.integers(1, 4), bulk=st.booleans(), max_new=st.integers(1, 5))
    def submit(self, count: int, bulk: bool, max_new: int) -> None:
        bodies = [
            JobCreate(prompt=f"job {i} a b", max_new_tokens=max_new, callback_url=CALLBACK)
            for i in range(count)
        ]
        with get_sessionmaker(self.url)() as session:
            if bulk:
                made, _ = submit.submit_jobs(session, self.queue, bodies, settings=self.settings)
            else:
                made = [
                    submit.submit_job(session, self.queue, body, settings=self.settings)[0]
                    for body in bodies
                ]
        for job in made:
            self.max_new[job.id] = max_new

    @precondition(lambda self: self.max_new)
    @rule(pick=st.integers(0, 10_000))
    def cancel(self, pick: int) -> None:
        job_id = list(self.max_new)[pick % len(self.max_new)]
        before = self._row(job_id).status
        try:
            with session_scope(self.url) as session:
                cancel_job(session, job_id)
        except JobConflictError:
            assert before in ("succeeded", "failed"), f"cancel refused on a {before} job"
            return
        assert before not in ("succeeded", "failed"), f"cancel accepted on a {before} job"
        assert self._row(job_id).status == "cancelled"

    # --- a worker's side -------------------------------------------------------

    @precondition(lambda self: self.broker)
    @rule(worker=st.integers(0, 2), pick=st.integers(0, 10_000), duplicate=st.booleans())
    def take_message(self, worker: int, pick: int, duplicate: bool) -> None:
        """A worker takes a message (``duplicate``: another copy stays in the broker)
        and claims its fresh jobs together, as the runtime does; the suspects (jobs
        attempted before) it claims one by one later (:meth:`claim_suspect`)."""
        index = pick % len(self.broker)
        job_ids = list(self.broker[index])
        if not duplicate:
            del self.broker[index]
        holder = self.workers[worker]
        with session_scope(self.url) as session:
            claims, suspects = claim_fresh(session, job_ids, worker=holder.name, lease_s=LEASE_S)
        until = self.clock() + dt.timedelta(seconds=LEASE_S)
        holder.held += [Held(claim, until) for claim in claims]
        holder.suspects += suspects

    @precondition(lambda self: any(w.suspects for w in self.workers))
    @rule(worker=st.integers(0, 2))
    def claim_suspect(self, worker: int) -> None:
        """A worker claims the next suspect of a message it took, alone."""
        holder = next(w for w in self._rotated(worker) if w.suspects)
        job_id = holder.suspects.pop(0)
        with session_scope(self.url) as session:
            claim = claim_job(
                session, job_id, worker=holder.name, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS
            )
        if claim is not None:
            holder.held.append(Held(claim, self.clock() + dt.timedelta(seconds=LEASE_S)))

    @precondition(lambda self: any(w.held for w in self.workers))
    @rule(
        worker=st.integers(0, 2),
        kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
        cut=st.integers(0, 100),
    )
    def store(self, worker: int, kinds: list[str], cut: int) -> None:
        """A worker stores the results of some of its jobs in one transaction."""
        holder = next(w for w in self._rotated(worker) if w.held)
        taken, holder.held = holder.held[: len(kinds)], holder.held[len(kinds) :]
        items = [
            (held.claim, outcome(kind, self.max_new[held.claim.job_id], cut))
            for held, kind in zip(taken, kinds, strict=False)
        ]
        before = {claim.job_id: self._row(claim.job_id) for claim, _ in items}
        with session_scope(self.url) as session:
            answers = store_outcomes(session, items)
        for (claim, result), ok in zip(items, answers, strict=True):
            then, now = before[claim.job_id], self._row(claim.job_id)
            if then.lease_token != claim.token:  # reclaimed meanwhile: a late write
                assert not ok, f"a stale token's write was accepted for {claim.job_id}"
                assert (now.status, now.lease_token, now.outputs, now.attempts) == (
                    then.status,
                    then.lease_token,
                    then.outputs,
                    then.attempts,
                ), f"a stale token's write changed {claim.job_id}"
            elif then.status == "running" and isinstance(result, Failure):
                assert ok and now.status == "failed", f"{claim.job_id}: failure not stored"
            elif then.status == "running" and isinstance(result, Outcome) and not result.aborted:
                assert ok and now.status == "succeeded", f"{claim.job_id}: result not stored"
            self.stored.append((claim, result))

    @precondition(lambda self: self.stored)
    @rule(pick=st.integers(0, 10_000))
    def store_again(self, pick: int) -> None:
        """The same store once more: its first commit went through but the worker
        did not hear back (a connection lost at commit), so it retries."""
        with session_scope(self.url) as session:
            store_outcomes(session, [self.stored[pick % len(self.stored)]])

    @rule(worker=st.integers(0, 2))
    def renew(self, worker: int) -> None:
        holder = self.workers[worker]
        with session_scope(self.url) as session:
            renew_leases(session, [held.claim for held in holder.held], lease_s=LEASE_S)
        now = self.clock()
        for held in holder.held:
            if held.lease_until >= now:  # a lapsed lease may already be another's
                held.lease_until = now + dt.timedelta(seconds=LEASE_S)

    @precondition(lambda self: any(w.held for w in self.workers))
    @rule(worker=st.integers(0, 2), tokens=st.integers(1, 3))
    def progress(self, worker: int, tokens: int) -> None:
        holder = next(w for w in self._rotated(worker) if w.held)
        with session_scope(self.url) as session:
            record_progress(session, [(h.claim, tokens, " w" * tokens, 2) for h in holder.held])

    @precondition(lambda self: any(w.held for w in self.workers))
    @rule(worker=st.integers(0, 2))
    def hand_back(self, worker: int) -> None:
        """A worker shutting down hands a job back and re-sends it."""
        holder = next(w for w in self._rotated(worker) if w.held)
        held = holder.held.pop(0)
        with session_scope(self.url) as session:
            released = release_job(session, held.claim)
        if released:
            self.queue.enqueue(held.claim.job_id, model=held.claim.model)

    @rule(worker=st.integers(0, 2))
    def die(self, worker: int) -> None:
        """A worker process dies: what it held is gone with it."""
        self.workers[worker] = self._fresh_worker()

    def _rotated(self, start: int) -> list[Worker]:
        return self.workers[start:] + self.workers[:start]

    # --- time and the sweeper --------------------------------------------------

    @rule(seconds=st.sampled_from([0.5, SWEEP_S, LEASE_S + SWEEP_S]))
    def time_passes(self, seconds: float) -> None:
        """Time passes; the sweeper runs once a sweep interval, as its thread does
        (after a long pause, once: what it does then is what the sweeps it would
        have run meanwhile do, as each finds what the one before left)."""
        self.clock.advance(seconds)
        if self.clock() - self.last_sweep >= dt.timedelta(seconds=SWEEP_S):
            self._sweep()

    def _sweep(self) -> None:
        sent = len(self.broker)
        assert self.sweeper.sweep_once(), "the sweeper did not get its lock"
        self.last_sweep = self.clock()
        # Ids are random and rows come back in the database's order: put what the
        # sweep sent in submission order, so that a replayed history replays.
        order = {job_id: index for index, job_id in enumerate(self.max_new)}
        resent = sorted((i for m in self.broker[sent:] for i in m), key=order.__getitem__)
        self.broker[sent:] = [resent[i : i + 8] for i in range(0, len(resent), 8)]

    # --- what must always hold --------------------------------------------------

    @invariant()
    def job_rules_hold(self) -> None:
        if not self.max_new:
            return
        ids = list(self.max_new)
        with session_scope(self.url) as session:
            rows = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
            events: dict[str, list[str]] = {job_id: [] for job_id in ids}
            query = select(WebhookDelivery.job_id, WebhookDelivery.event).where(
                WebhookDelivery.job_id.in_(ids)
            )
            for job_id, event in session.execute(query):
                events[str(job_id)].append(event)
        for job_id, job in rows.items():
            status = str(job.status)
            before = self.seen.get(job_id)
            assert before not in FINAL or status == before, f"{job_id}: {before} -> {status}"
            self.seen[job_id] = status
            assert job.attempts <= MAX_ATTEMPTS, f"{job_id}: {job.attempts} attempts"
            expected = [f"job.{status}"] if status in FINAL else []
            assert events[job_id] == expected, f"{job_id} is {status}; events {events[job_id]}"
            if status == "succeeded":
                self._check_output(job)
            if status == "running":
                assert job.lease_expires_at is not None and job.lease_token is not None
                assert job.lease_expires_at >= self.last_sweep, (
                    f"{job_id} still running at {self.clock()}: its lease ended at "
                    f"{job.lease_expires_at}, before the sweep at {self.last_sweep}"
                )
        now = self.clock()
        for worker in self.workers:
            for held in worker.held:
                job = rows[held.claim.job_id]
                if held.lease_until >= now:  # its worker kept the lease current
                    assert job.lease_token == held.claim.token and job.status in (
                        "running",
                        "cancelled",
                    ), f"{job.id} was taken from {worker.name} with its lease current"

    def _check_output(self, job: Job) -> None:
        max_new = self.max_new[job.id]
        assert job.outputs is not None and job.finish_reasons is not None, job.id
        assert len(job.outputs) == len(job.finish_reasons) == 1, job.id
        (reason,) = job.finish_reasons
        tokens = job.completion_tokens
        if reason == "length":
            assert tokens == max_new, f"{job.id}: finish reason length with {tokens}/{max_new}"
        else:
            assert reason == "stop" and tokens is not None and tokens <= max_new, (
                f"{job.id}: finish reason {reason} with {tokens}/{max_new} tokens"
            )

    # --- at the end, nothing is lost --------------------------------------------

    def teardown(self) -> None:
        """A fresh worker takes every message and completes every job it gets;
        time passes so that leases lapse and the sweeper re-sends: every job ends."""
        drainer = self._fresh_worker()
        self.workers = [drainer]
        for _ in range(40):
            if not self._unfinished():
                break
            while self.broker:
                self.take_message(0, 0, duplicate=False)
            while drainer.suspects:
                self.claim_suspect(0)
            if drainer.held:
                self.store(0, ["length"] * len(drainer.held), 0)
            self.time_passes(SWEEP_S)
            self.job_rules_hold()
        assert not self._unfinished(), "jobs never finished"


@pytest.fixture
def machine(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[JobMachine]:
    """The machine, bound to a fresh database and a fake clock every core module reads."""
    clock, real = Clock(), models.utcnow
    for name, module in list(sys.modules.items()):  # every core module's idea of now
        if name.startswith("core.") and getattr(module, "utcnow", None) is real:
            monkeypatch.setattr(module, "utcnow", clock)
    # Which queue a short job goes to depends on its owner's express budget, which
    # refills in real time: unlimited here, so that a replayed history replays.
    monkeypatch.setattr(express, "PACE", RateLimiter(express.EXPRESS_RATE_PER_S, 10**9))
    JobMachine.url = postgres_url
    JobMachine.clock = clock
    JobMachine.settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        model="fake",
        require_auth=False,
        max_attempts=MAX_ATTEMPTS,
        lease_s=LEASE_S,
        sweep_interval_s=SWEEP_S,
        requeue_after_s=REQUEUE_AFTER_S,
    )
    return JobMachine


def test_random_histories_keep_the_job_rules(machine: type[JobMachine]) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def _duplicate_suspects(m: JobMachine) -> None:
    """A job at its last attempt in two messages: worker 2 claims it, then worker 1's
    claim of the duplicate fails; that must not fail worker 2's running job."""
    m.submit(count=1, bulk=False, max_new=2)
    m.take_message(worker=0, pick=0, duplicate=False)
    m.time_passes(LEASE_S + SWEEP_S)  # worker 0 stalled: its lease lapsed, job re-sent
    m.take_message(worker=1, pick=0, duplicate=True)
    m.take_message(worker=2, pick=0, duplicate=False)
    m.claim_suspect(worker=2)
    m.job_rules_hold()
    m.claim_suspect(worker=1)


def _store_retried(m: JobMachine) -> None:
    """A store whose commit went through, retried: still one terminal event."""
    m.submit(count=2, bulk=True, max_new=3)
    m.take_message(worker=0, pick=0, duplicate=False)
    m.store(worker=0, kinds=["length", "failed"], cut=0)
    m.job_rules_hold()
    m.store_again(pick=0)
    m.store_again(pick=1)


def _aborted_result(m: JobMachine) -> None:
    """An aborted generation (time limit) met a job not cancelled: never a success."""
    m.submit(count=1, bulk=False, max_new=4)
    m.take_message(worker=0, pick=0, duplicate=False)
    m.store(worker=0, kinds=["aborted"], cut=1)


def _cancel_while_running(m: JobMachine) -> None:
    """Cancelled while it ran: the late result keeps the job cancelled, one event."""
    m.submit(count=1, bulk=False, max_new=2)
    m.take_message(worker=0, pick=0, duplicate=False)
    m.cancel(pick=0)
    m.job_rules_hold()
    m.store(worker=0, kinds=["length"], cut=0)


@pytest.mark.parametrize(
    "history", [_duplicate_suspects, _store_retried, _aborted_result, _cancel_while_running]
)
def test_known_histories_keep_the_job_rules(
    machine: type[JobMachine], history: Callable[[JobMachine], None]
) -> None:
    """Histories too specific for a random search to meet often, through the same
    machine and rules: three defects of genq before issue 11 (duplicate suspects, a
    retried store, an aborted result stored as a success) and a cancel mid-run."""
    state = machine()
    history(state)
    state.job_rules_hold()
    state.teardown()
