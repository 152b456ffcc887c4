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

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session

from core import delivery, workers
from core.db import run_with_retry, session_scope
from core.queue import JobQueue, queues_for
from core.settings import Settings
from worker.engine.base import Engine, GenerationError, GenerationRequest, GenerationResult
from worker.isolation import SharedExclusiveLock

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        self._in_flight: dict[str, delivery.Claim] = {}
        self._reported: dict[str, int] = {}
        self._handing_back: set[str] = set()
        self._isolation = SharedExclusiveLock()
        self._draining = threading.Event()
        self._stop = threading.Event()
        self._last_renewal = 0.0
        self._monitor = threading.Thread(
            target=self._monitor_loop, name="genq-monitor", daemon=True
        )
        self._monitor.start()

    def _db(self, fn: Callable[[Session], T]) -> T:
        return run_with_retry(fn, self._db_url, retry_s=self.settings.db_retry_s)

    # --- one job -------------------------------------------------------------

    def run_job(self, job_id: str, *, worker: str) -> str:
        """Claim, generate and store one job; returns the status it ended in."""
        if self._draining.is_set():
            raise DrainingError(job_id)
        previous = self._db(lambda s: delivery.queued_attempts(s, job_id))
        if previous is None:
            log.info("job %s not queued (cancelled, taken, finished or unknown): skipped", job_id)
            return "skipped"
        # A job retried after its worker died may be what killed it: it runs alone,
        # and nothing else is claimed meanwhile, so only it spends its attempts.
        suspect = previous > 0
        with self._isolation.exclusive() if suspect else self._isolation.shared():
            claim = self._db(
                lambda s: delivery.claim_job(
                    s,
                    job_id,
                    worker=worker,
                    lease_s=self.settings.lease_s,
                    max_attempts=self.settings.max_attempts,
                )
            )
            if claim is None:
                log.info("job %s taken meanwhile: skipped", job_id)
                return "skipped"
            with self._lock:
                self._in_flight[claim.job_id] = claim
            return self._run_claimed(claim)

    def _run_claimed(self, claim: delivery.Claim) -> str:
        if claim.model != self.engine.info.name:
            with self._lock:
                self._in_flight.pop(claim.job_id, None)
            message = f"this worker serves {self.engine.info.name!r}, not {claim.model!r}"
            return self._fail(claim, GenerationError("model_not_served", message))
        request = GenerationRequest(
            id=claim.job_id, prompt=claim.prompt, params=claim.params, seed=claim.seed
        )
        try:
            result = self.engine.submit(request).result(timeout=self.settings.task_time_limit_s)
        except GenerationError as exc:
            return self._fail(claim, exc)
        except Exception as exc:
            log.exception("job %s failed", claim.job_id)
            error = GenerationError("internal_error", f"{type(exc).__name__}: {exc}")
            return self._fail(claim, error)
        finally:
            with self._lock:
                self._in_flight.pop(claim.job_id, None)
                self._reported.pop(claim.job_id, None)
                handing_back = claim.job_id in self._handing_back
                self._handing_back.discard(claim.job_id)
        if handing_back:
            return self._hand_back(claim)
        return self._finish(claim, result)

    def _finish(self, claim: delivery.Claim, result: GenerationResult) -> str:
        info = self.engine.info
        outcome = delivery.Outcome(
            outputs=result.outputs,
            finish_reasons=list(result.finish_reasons),
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            model_revision=info.revision,
            torch_version=info.torch_version,
            transformers_version=info.transformers_version,
        )
        status = "cancelled" if result.aborted else "succeeded"
        self.tokens_generated += result.completion_tokens
        if self._db(lambda s: delivery.finish_job(s, claim, outcome)):
            log.info("job %s %s: result stored (attempt %d)", claim.job_id, status, claim.attempt)
        else:
            log.warning("job %s: claim lost (lease expired); result not stored", claim.job_id)
        return status

    def _fail(self, claim: delivery.Claim, error: GenerationError) -> str:
        self._db(lambda s: delivery.fail_job(s, claim, code=error.code, message=error.message))
        return "failed"

    def _hand_back(self, claim: delivery.Claim) -> str:
        if self._db(lambda s: delivery.release_job(s, claim)) and self.queue is not None:
            try:
                self.queue.enqueue(claim.job_id, model=claim.model, priority=claim.priority)
            except Exception:  # the sweeper re-sends it
                log.warning("job %s handed back but not re-sent", claim.job_id, exc_info=True)
        log.info("job %s handed back to the queue", claim.job_id)
        return "handed_back"

    # --- shutdown ------------------------------------------------------------

    def drain(self, grace_s: float) -> None:
        """Stop taking jobs; jobs still running after ``grace_s`` are handed back."""
        self._draining.set()
        timer = threading.Timer(grace_s, self._hand_back_all)
        timer.daemon = True
        timer.start()

    def _hand_back_all(self) -> None:
        with self._lock:
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
        """Heart-beat, renew leases, write changed progress, and abort cancelled jobs."""
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
                changed.append((claim, progress.tokens, progress.text))
                self._reported[claim.job_id] = progress.tokens
            delivery.record_progress(session, changed)
            cancelled = delivery.cancelled_among(session, (c.job_id for c in claims))
        if renew:
            self._last_renewal = time.monotonic()
        for job_id in cancelled:
            self.engine.abort(job_id)

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
