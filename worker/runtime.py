"""The per-process worker runtime: one engine, the jobs in flight, and their monitor.

A Celery task calls :meth:`WorkerRuntime.run_job` with a job id. The runtime
claims the job in SQL, hands it to the engine (which batches it with the other
jobs in flight) and stores the result conditionally on its claim. One monitor
thread, not one per job, renews the leases, writes progress and notices
cancellations, so the database sees a few statements per interval however many
jobs run.

A job claimed again after its lease expired (its worker died while it ran) is a
suspect: it may be what killed the worker. It runs alone, with no other job in
flight in this process, so a poison job exhausts only its own attempts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TypeVar

from sqlalchemy.orm import Session

from core import delivery, jobstate, workers
from core.db import run_with_retry, session_scope
from core.express import EXPRESS_ROWS
from core.queue import URGENT_RANK, JobQueue, lane_rank, queues_for
from core.settings import Settings
from worker.claims import GroupClaimer
from worker.engine.base import (
    REQUEUE,
    Engine,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)
from worker.groupcommit import GroupCommit
from worker.isolation import JobSlots, SharedExclusiveLock
from worker.pacing import BulkPacer

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long to wait for requests aborted at the time limit to let go of the engine.
ABORT_WAIT_S = 5.0

# Engine errors that are not the job's fault: the job goes back to the queue.
_HAND_BACK_CODES = frozenset({REQUEUE, "engine_failed", "engine_stopped"})
# How long a worker whose engine died waits for its task threads to hand their jobs
# back before it hands back (from the monitor) what they still hold.
DEAD_ENGINE_GRACE_S = 5.0


StoreItem = tuple[jobstate.Claim, jobstate.Outcome | jobstate.Failure]

HANDED_BACK = "handed_back"
"""The status of a job given back to the queue by a stopping worker."""


class DrainingError(RuntimeError):
    """The worker is shutting down and takes no new job; the message goes back."""


class WorkerRuntime:
    """Everything a worker process holds: settings, the engine, the jobs in flight."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        queue: JobQueue | None = None,
        *,
        name: str = "worker",
        pacer: BulkPacer | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.tokens_generated = 0
        self._last_heartbeat = 0.0
        self._heartbeat_lock = threading.Lock()
        self.engine = engine
        self.queue = queue
        self._db_url = settings.resolved_database_url
        self._lock = threading.Lock()
        self._in_flight: dict[str, jobstate.Claim] = {}
        # Messages arriving together are claimed in one statement (worker.claims).
        # Those of high and express messages apart from the others': a web app's job
        # never waits for a round of a batch's claims or stores.
        self._claimers: dict[tuple[str, bool], GroupClaimer] = {}
        # Results stored together likewise: one transaction for every task thread
        # storing at the same moment (worker.groupcommit).
        self._draining = threading.Event()
        # While a web app's jobs are about, the others' rounds pause (worker.pacing);
        # a worker shutting down stops pausing.
        self.pacer = pacer or BulkPacer(settings.bulk_share, sleep=self._draining.wait)
        self._storers: dict[bool, GroupCommit[StoreItem, bool]] = {
            False: GroupCommit(self.pacer.paced(self._store_outcomes)),
            True: GroupCommit(self._store_outcomes),
        }
        self._reported: dict[str, int] = {}
        self._handing_back: set[str] = set()
        self._isolation = SharedExclusiveLock()
        # A few more slots than the worker's concurrency, kept for high and express
        # messages: a web app's job never waits for a batch's messages to free one.
        self._slots = JobSlots(
            settings.resolved_worker_concurrency + EXPRESS_ROWS,
            reserved=EXPRESS_ROWS,
            urgent_rank=URGENT_RANK,
        )
        self._hand_back_now = False  # past the shutdown grace: running jobs go back
        self._stop = threading.Event()
        self._last_renewal = 0.0
        # Called once the engine is found dead and the jobs are handed back (the
        # lifecycle exits the process non-zero, so its supervisor restarts it).
        self.on_engine_dead: Callable[[], None] | None = None
        self._engine_dead = False
        self._monitor = threading.Thread(
            target=self._monitor_loop, name="genq-monitor", daemon=True
        )
        self._monitor.start()

    def _db(self, fn: Callable[[Session], T]) -> T:
        return run_with_retry(fn, self._db_url, retry_s=self.settings.db_retry_s)

    # --- jobs -------------------------------------------------------------

    def run_job(self, job_id: str, *, worker: str) -> str:
        """Claim, generate and store one job; returns the status it ended in."""
        return self.run_jobs([job_id], worker=worker)[job_id]

    def run_jobs(
        self, job_ids: Sequence[str], *, worker: str, queue: str | None = None
    ) -> dict[str, str]:
        """Claim, generate and store the jobs of one message; returns each one's
        final status ("skipped" where it was not queued: cancelled, taken,
        finished or unknown).

        Jobs never attempted before are claimed in one statement and generated
        together. A job retried after its worker died may be what killed it: it
        runs alone, with nothing else claimed meanwhile, so only it spends its
        attempts.
        """
        ids = list(dict.fromkeys(job_ids))
        if self._draining.is_set() or not self.engine.check_health():
            raise DrainingError(ids)
        statuses = dict.fromkeys(ids, "skipped")
        # Free slots go to the message from the queue read first (high, express, ...).
        rank = lane_rank(queue)
        urgent = rank <= URGENT_RANK
        with (
            self.pacer.urgent() if urgent else contextlib.nullcontext(),
            self._slots.hold(len(ids), rank=rank) as held,
        ):
            with self._isolation.shared():
                # Checked again once a slot is free: a message that waited for one
                # while the worker began shutting down must not start its jobs.
                if self._draining.is_set():
                    raise DrainingError(ids)
                claims, suspects = self._claimer(worker, urgent).claim(ids)
                held.keep(len(claims))  # the others do not run here (suspects: below, alone)
                statuses.update(self._run_claimed(claims, urgent=urgent, running=held.keep))
            for job_id in suspects:
                if self._draining.is_set():
                    raise DrainingError(job_id)  # the message goes back; done jobs are skipped
                with self._isolation.exclusive():
                    claim = self._db(functools.partial(self._claim_suspect, job_id, worker))
                    if claim is not None:
                        # Stored without a pause: every other message waits for it.
                        statuses.update(self._run_claimed([claim], urgent=True))
        skipped = [i for i, status in statuses.items() if status == "skipped"]
        if skipped:
            log.info("jobs %s not queued (cancelled, taken or finished): skipped", skipped)
        return statuses

    def _claimer(self, worker: str, urgent: bool = False) -> GroupClaimer:
        """The group claimer of ``worker`` (the Celery hostname; one per process) for
        high and express messages (``urgent``) or the others."""
        with self._lock:
            claimer = self._claimers.get((worker, urgent))
            if claimer is None:
                claim_fresh = functools.partial(self._claim_fresh, worker)
                claimer = self._claimers[worker, urgent] = GroupClaimer(
                    claim_fresh if urgent else self.pacer.paced(claim_fresh)
                )
            return claimer

    def _claim_fresh(self, worker: str, ids: list[str]) -> tuple[list[jobstate.Claim], list[str]]:
        return self._db(
            lambda s: jobstate.claim_fresh(s, ids, worker=worker, lease_s=self.settings.lease_s)
        )

    def _claim_suspect(self, job_id: str, worker: str, session: Session) -> jobstate.Claim | None:
        return jobstate.claim_job(
            session,
            job_id,
            worker=worker,
            lease_s=self.settings.lease_s,
            max_attempts=self.settings.max_attempts,
        )

    def _run_claimed(
        self,
        claims: list[jobstate.Claim],
        *,
        urgent: bool = False,
        running: Callable[[int], None] | None = None,
    ) -> dict[str, str]:
        """Generate the claimed jobs together; store each result as it comes (those
        that finish together in one transaction), then tell ``running`` how many are
        still generating (the job slots of the others are free for other messages)."""
        if not claims:
            return {}
        futures: dict[Future[GenerationResult], jobstate.Claim] = {}
        ready: list[tuple[jobstate.Claim, GenerationResult | GenerationError]] = []
        with self._lock:
            self._in_flight.update((c.job_id, c) for c in claims)
            if self._hand_back_now:  # claimed just as running jobs were handed back
                self._handing_back.update(c.job_id for c in claims)
                gone = GenerationError("handed_back", "the worker is shutting down")
                ready, claims = [(c, gone) for c in claims], []
        for claim in claims:
            if claim.model != self.engine.info.name:
                message = f"this worker serves {self.engine.info.name!r}, not {claim.model!r}"
                ready.append((claim, GenerationError("model_not_served", message)))
                continue
            request = GenerationRequest(
                id=claim.job_id,
                prompt=claim.prompt,
                params=claim.params,
                seed=claim.seed,
                messages=claim.messages,
                priority=claim.priority,
            )
            futures[self.engine.submit(request)] = claim
        statuses: dict[str, str] = {}
        deadline = time.monotonic() + self.settings.task_time_limit_s
        pending = set(futures)
        try:
            while True:
                statuses.update(self._store(ready, urgent=urgent))
                if running is not None and ready:
                    running(len(pending))
                if not pending:
                    return statuses
                done, pending = wait(
                    pending,
                    timeout=max(deadline - time.monotonic(), 0),
                    return_when=FIRST_COMPLETED,
                )
                if not done:  # past the time limit: stop them and fail them
                    for future in pending:
                        self.engine.abort(futures[future].job_id)
                    # Wait for the aborts to land (a few steps), then store each as
                    # a timeout, never as the short output it may have made: an
                    # aborted request is not a success, whether it ran or waited.
                    wait(pending, timeout=ABORT_WAIT_S)
                    ready = [(futures[f], _timed_out(f)) for f in pending]
                    pending = set()
                    continue
                ready = [(futures[f], _outcome(f)) for f in done]
        except BaseException:
            # The database stayed down past its retries: let go of what is left. Its
            # leases are no longer renewed, so the sweeper hands those jobs back.
            with self._lock:
                for claim in claims:
                    self._in_flight.pop(claim.job_id, None)
            for future in pending:
                self.engine.abort(futures[future].job_id)
            raise

    def _store(
        self,
        ready: list[tuple[jobstate.Claim, GenerationResult | GenerationError]],
        *,
        urgent: bool = False,
    ) -> dict[str, str]:
        """Store finished generations in one transaction; hand back those the
        worker gave up on while shutting down."""
        if not ready:
            return {}
        with self._lock:
            for claim, _ in ready:
                self._in_flight.pop(claim.job_id, None)
                self._reported.pop(claim.job_id, None)
            handing_back = {c.job_id for c, _ in ready} & self._handing_back
            self._handing_back -= handing_back
        # The engine could not place these (not their fault): back to the queue. One
        # that cannot run even alone (out of memory) uses an attempt each time, so
        # max_attempts ends it instead of it coming back (and disturbing the batch) forever.
        counted = {c.job_id for c, r in ready if _counted_requeue(r)} - handing_back
        handing_back |= {c.job_id for c, r in ready if _requeued(r)}
        statuses = {
            job_id: self._hand_back(c, counted=job_id in counted)
            for c, _ in ready
            if (job_id := c.job_id) in handing_back
        }
        to_store = [(c, r) for c, r in ready if c.job_id not in handing_back]
        outcomes = [(c, self._outcome_row(r)) for c, r in to_store]
        stored = self._storers[urgent](outcomes) if outcomes else []
        for (claim, result), ok in zip(to_store, stored, strict=True):
            status = _status(result)
            statuses[claim.job_id] = status
            if isinstance(result, GenerationResult):
                self.tokens_generated += result.completion_tokens
            if not ok:
                log.warning("job %s: claim lost (lease expired); result not stored", claim.job_id)
            elif status == "failed":
                log.info("job %s failed: %s", claim.job_id, result)
            else:
                log.info(
                    "job %s %s: result stored (attempt %d)", claim.job_id, status, claim.attempt
                )
        return statuses

    def _store_outcomes(self, outcomes: list[StoreItem]) -> list[bool]:
        return self._db(lambda s: jobstate.store_outcomes(s, outcomes))

    def _outcome_row(
        self, result: GenerationResult | GenerationError
    ) -> jobstate.Outcome | jobstate.Failure:
        if isinstance(result, GenerationError):
            return jobstate.Failure(result.code, result.message)
        info = self.engine.info
        return jobstate.Outcome(
            outputs=result.outputs,
            finish_reasons=list(result.finish_reasons),
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            model_revision=info.revision,
            torch_version=info.torch_version,
            transformers_version=info.transformers_version,
            dtype=info.dtype,
            products=info.products,
            aborted=result.aborted,
            logprobs=result.logprobs,
            prompt=result.prompt,
        )

    def _hand_back(self, claim: jobstate.Claim, *, counted: bool = False) -> str:
        """Return a running job to queued, its attempt uncounted unless ``counted``.
        Its message goes back to the broker through the caller (the Celery task rejects it with
        requeue): a new send from a stopping worker would need a second broker
        connection, and on the embedded SQLite broker it waits on the consumer's."""
        self._db(lambda s: jobstate.release_job(s, claim, counted=counted))
        log.info("job %s handed back to the queue", claim.job_id)
        return HANDED_BACK

    # --- shutdown ------------------------------------------------------------

    def drain(self, grace_s: float) -> None:
        """Stop taking jobs; jobs still running after ``grace_s`` are handed back."""
        self._draining.set()
        timer = threading.Timer(grace_s, self._hand_back_all)
        timer.daemon = True
        timer.start()

    def _hand_back_all(self) -> None:
        with self._lock:
            self._hand_back_now = True
            ids = list(self._in_flight)
            self._handing_back.update(ids)
        for job_id in ids:
            self.engine.abort(job_id)

    # --- the monitor ---------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.settings.progress_interval_s):
            try:
                self.monitor_once()
            except Exception:  # the monitor must outlive a database blip
                log.exception("progress monitor failed; retrying next interval")

    def monitor_once(self) -> None:
        """Heart-beat, renew leases, write changed progress, and abort cancelled jobs;
        or, once the engine is dead, leave (no heartbeat for a worker that cannot work)."""
        if not self.engine.check_health():
            self._leave_with_dead_engine()
            return
        with self._lock:
            claims = list(self._in_flight.values())
        if time.monotonic() - self._last_heartbeat >= self.settings.worker_heartbeat_s:
            self.heartbeat(in_flight=len(claims))
        if not claims:
            return
        renew = time.monotonic() - self._last_renewal >= self.settings.lease_s / 3
        with session_scope(self._db_url) as session:
            if renew:
                delivery.renew_leases(session, claims, lease_s=self.settings.lease_s)
            changed = []
            for claim in claims:
                progress = self.engine.progress(claim.job_id)
                if progress is None or progress.tokens == self._reported.get(claim.job_id):
                    continue
                changed.append((claim, progress.tokens, progress.text, progress.prompt_tokens))
                self._reported[claim.job_id] = progress.tokens
            delivery.record_progress(session, changed)
            cancelled = delivery.cancelled_among(session, (c.job_id for c in claims))
        if renew:
            self._last_renewal = time.monotonic()
        for job_id in cancelled:
            self.engine.abort(job_id)

    def _leave_with_dead_engine(self) -> None:
        """Stop taking jobs, hand back those held, leave the registry, then call
        :attr:`on_engine_dead`."""
        if self._engine_dead:
            return
        self._engine_dead = True
        log.error("the engine stopped: handing back this worker's jobs and leaving")
        self._draining.set()
        deadline = time.monotonic() + DEAD_ENGINE_GRACE_S
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)  # task threads hand back the jobs the engine failed
        with self._lock:
            left = list(self._in_flight.values())
            self._in_flight.clear()
        for claim in left:
            self._hand_back(claim)
        try:
            with session_scope(self._db_url) as session:
                workers.deregister(session, self.name)
        except Exception:  # the row expires by itself
            log.warning("could not deregister worker %s", self.name, exc_info=True)
        if self.on_engine_dead is not None:
            self.on_engine_dead()

    def heartbeat(self, *, in_flight: int = 0) -> None:
        """Register this worker (its model and queues) as alive."""
        queues = queues_for(self.settings.queue, self.engine.info.name)
        with self._heartbeat_lock, session_scope(self._db_url) as session:
            workers.heartbeat(
                session,
                name=self.name,
                model=self.engine.info.name,
                queues=queues,
                in_flight=in_flight,
                tokens_generated=self.tokens_generated,
                chat=self.engine.info.chat_template,
            )
        self._last_heartbeat = time.monotonic()

    def close(self) -> None:
        """Stop the monitor and the engine, and leave the registry."""
        self._stop.set()
        self._monitor.join(timeout=5)
        self.engine.close()
        try:
            with session_scope(self._db_url) as session:
                workers.deregister(session, self.name)
        except Exception:  # the row expires by itself
            log.warning("could not deregister worker %s", self.name, exc_info=True)


def _outcome(future: Future[GenerationResult]) -> GenerationResult | GenerationError:
    """A finished future's result, or the error to store for it."""
    try:
        return future.result(timeout=0)
    except GenerationError as exc:
        return exc
    except TimeoutError:
        return GenerationError("timeout", "the job ran past the task time limit")
    except Exception as exc:
        log.exception("generation failed")
        return GenerationError("internal_error", f"{type(exc).__name__}: {exc}")


def _requeued(result: GenerationResult | GenerationError) -> bool:
    return isinstance(result, GenerationError) and result.code in _HAND_BACK_CODES


def _counted_requeue(result: GenerationResult | GenerationError) -> bool:
    return isinstance(result, GenerationError) and result.code == REQUEUE


def _timed_out(future: Future[GenerationResult]) -> GenerationError:
    """What to store for a request stopped at the task time limit."""
    message = "the job ran past the task time limit (GENQ_TASK_TIME_LIMIT_S)"
    if future.done() and future.exception(timeout=0) is not None:
        outcome = _outcome(future)
        if isinstance(outcome, GenerationError):
            return outcome  # it failed by itself meanwhile: keep its own error
    return GenerationError("timeout", message)


def _status(result: GenerationResult | GenerationError) -> str:
    if isinstance(result, GenerationError):
        return "failed"
    return "cancelled" if result.aborted else "succeeded"
