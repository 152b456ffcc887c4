"""The per-process worker runtime: one engine, the jobs in flight, and their monitor.

A Celery task calls :meth:`WorkerRuntime.run_job` with a job id. The runtime
claims the job in SQL, hands it to the engine (which batches it with the other
jobs in flight) and stores the result conditionally on its claim. One monitor
thread, not one per job, writes progress and notices cancellations, so the
database sees a couple of statements per interval however many jobs run.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from core import jobs
from core.db import session_scope
from core.settings import Settings
from worker.engine.base import Engine, GenerationError, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Everything a worker process holds: settings, the engine, the jobs in flight."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._db_url = settings.resolved_database_url
        self._lock = threading.Lock()
        self._in_flight: dict[str, jobs.Claim] = {}
        self._reported: dict[str, int] = {}
        self._stop = threading.Event()
        self._monitor = threading.Thread(
            target=self._monitor_loop, name="genq-monitor", daemon=True
        )
        self._monitor.start()

    # --- one job -------------------------------------------------------------

    def run_job(self, job_id: str, *, worker: str) -> str:
        """Claim, generate and store one job; returns the status it ended in."""
        with session_scope(self._db_url) as session:
            claim = jobs.claim_job(session, job_id, worker=worker)
        if claim is None:
            log.info("job %s not queued (cancelled, taken or unknown): skipped", job_id)
            return "skipped"
        if claim.model != self.engine.info.name:
            return self._fail(
                claim,
                GenerationError(
                    "model_not_served",
                    f"this worker serves {self.engine.info.name!r}, not {claim.model!r}",
                ),
            )
        request = GenerationRequest(
            id=claim.job_id, prompt=claim.prompt, params=claim.params, seed=claim.seed
        )
        with self._lock:
            self._in_flight[claim.job_id] = claim
        try:
            future = self.engine.submit(request)
            result = self._wait(future)
        except GenerationError as exc:
            return self._fail(claim, exc)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            return self._fail(
                claim, GenerationError("internal_error", f"{type(exc).__name__}: {exc}")
            )
        finally:
            with self._lock:
                self._in_flight.pop(claim.job_id, None)
                self._reported.pop(claim.job_id, None)
        return self._finish(claim, result)

    def _wait(self, future: Future[GenerationResult]) -> GenerationResult:
        return future.result(timeout=self.settings.task_time_limit_s)

    def _finish(self, claim: jobs.Claim, result: GenerationResult) -> str:
        info = self.engine.info
        outcome = jobs.Outcome(
            outputs=result.outputs,
            finish_reasons=list(result.finish_reasons),
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            model_revision=info.revision,
            torch_version=info.torch_version,
            transformers_version=info.transformers_version,
        )
        with session_scope(self._db_url) as session:
            stored = jobs.finish_job(session, claim, outcome)
        if not stored:
            log.warning(
                "job %s attempt %d: result not stored (claim lost)", claim.job_id, claim.attempt
            )
        return "cancelled" if result.aborted else "succeeded"

    def _fail(self, claim: jobs.Claim, error: GenerationError) -> str:
        with session_scope(self._db_url) as session:
            jobs.fail_job(session, claim, code=error.code, message=error.message)
        return "failed"

    # --- the monitor ---------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.settings.progress_interval_s):
            try:
                self.monitor_once()
            except Exception:  # the monitor must outlive a database blip
                log.exception("progress monitor failed; retrying next interval")

    def monitor_once(self) -> None:
        """Write changed progress of jobs in flight, and abort cancelled ones."""
        with self._lock:
            claims = list(self._in_flight.values())
        if not claims:
            return
        with session_scope(self._db_url) as session:
            for claim in claims:
                progress = self.engine.progress(claim.job_id)
                if progress is None or progress.tokens == self._reported.get(claim.job_id):
                    continue
                jobs.record_progress(session, claim, tokens=progress.tokens, text=progress.text)
                self._reported[claim.job_id] = progress.tokens
            cancelled = jobs.cancelled_among(session, (c.job_id for c in claims))
        for job_id in cancelled:
            self.engine.abort(job_id)

    def close(self) -> None:
        """Stop the monitor and the engine."""
        self._stop.set()
        self._monitor.join(timeout=5)
        self.engine.close()


def _ids(claim: jobs.Claim) -> tuple[str, int]:
    return claim.job_id, claim.attempt
