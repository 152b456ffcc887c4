"""The sweeper: re-sends what the broker lost and reclaims what a dead worker held.

Every worker process runs one sweeper thread, but only the holder of the
``sweeper`` lock row acts, so one sweep runs at a time across the cluster. Each
sweep:

- hands running jobs whose lease expired back to the queue and re-sends them
  (or fails them with ``too_many_attempts`` once they used up their attempts);
- when the broker's waiting messages carry fewer job ids than SQL has queued jobs
  (a broker restart without persistence, a send that failed after the commit),
  re-sends the queued jobs that were last sent longer than ``requeue_after_s``
  ago. Jobs are compared with jobs, not with messages (a message carries up to
  ``GENQ_JOBS_PER_MESSAGE`` ids), and a priority's jobs with every queue that carries
  them (``normal`` and ``express``), so a long batch tail still waiting in the broker
  is not re-sent. A duplicate message is harmless: a claim is conditional, so a
  job runs once;
- fails each ``validating`` batch whose ingest stopped (its creator died) and
  deletes its jobs (:func:`core.batches.recover_stale`);
- purges finished jobs (and batches, files, idempotency keys) older than the
  retention age, once an hour.
"""

from __future__ import annotations

import logging
import time

from core import batches, delivery, idempotency, jobstate, submit
from core.db import get_sessionmaker, session_scope
from core.queue import JobQueue, Route, queues_carrying
from core.settings import Settings
from worker.periodic import Periodic

log = logging.getLogger(__name__)

LOCK_NAME = "sweeper"
RESEND_BATCH = 1000
PURGE_EVERY_S = 3600.0


class Sweeper(Periodic):
    """A daemon thread sweeping every ``settings.sweep_interval_s``."""

    def __init__(self, settings: Settings, queue: JobQueue, *, holder: str) -> None:
        super().__init__(settings.sweep_interval_s, name="sweeper")
        self.settings = settings
        self.queue = queue
        self.holder = holder
        self._url = settings.resolved_database_url
        self._last_purge: float | None = None  # the first sweep purges

    def tick(self) -> object:
        return self.sweep_once()

    def sweep_once(self) -> dict[str, int]:
        """One sweep, if this process holds the lock; returns what it did."""
        ttl = self.settings.sweep_interval_s * 3
        with session_scope(self._url) as session:
            if not delivery.acquire_lock(session, LOCK_NAME, holder=self.holder, ttl_s=ttl):
                return {}
            requeued, failed = jobstate.reclaim_expired(
                session, max_attempts=self.settings.max_attempts
            )
        report = {"reclaimed": len(requeued), "quarantined": len(failed)}
        self._send(requeued)
        report["resent"] = self._resend_lost()
        factory = get_sessionmaker(self._url)
        report["batches_finalized"] = batches.finalize_due(factory)
        report["ingests_failed"] = batches.recover_stale(
            factory, stale_after_s=self.settings.ingest_stale_s
        )
        if self._last_purge is None or time.monotonic() - self._last_purge > PURGE_EVERY_S:
            report["purged"] = self._purge()
            self._last_purge = time.monotonic()
        if any(report.values()):
            log.info("sweep: %s", report)
        return report

    def _resend_lost(self) -> int:
        # Sent after the commit, as every message is: a worker's claim must not wait on
        # rows this transaction holds, and a failed commit must not leave messages out.
        lost: list[Route] = []
        with session_scope(self._url) as session:
            for (model, priority), queued in delivery.queued_counts(session).items():
                queues = queues_carrying(self.settings.queue, model, priority)
                if queued <= sum(self.queue.queued_jobs(queue) for queue in queues):
                    continue  # every queued job of this priority may still have its message
                routes = delivery.stale_queued(
                    session,
                    model=model,
                    priority=priority,
                    older_than_s=self.settings.requeue_after_s,
                    limit=RESEND_BATCH,
                )
                lost.extend(routes)
        self._send(lost)
        return len(lost)

    def _purge(self) -> int:
        days = self.settings.retention_days
        with session_scope(self._url) as session:
            jobs = delivery.purge_finished(session, older_than_days=days)
        with session_scope(self._url) as session:
            batch_count, file_count = batches.purge(session, older_than_days=days)
        with session_scope(self._url) as session:  # the keys of what was just purged
            keys = idempotency.purge(session, older_than_days=days)
        return jobs + batch_count + file_count + keys

    def _send(self, routes: list[Route]) -> None:
        submit.send(self.queue, routes)
