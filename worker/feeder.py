"""The feeder: keeps each queue topped up with a window of batch jobs (core.feed),
and finalizes the batches whose jobs are all final.

Every worker process runs one feeder thread, but only the holder of the
``feeder`` lock row sends, so the broker holds one window per queue, not one per
worker process. It keeps nothing in memory: after a restart it goes on from the
job rows (unsent ones have ``enqueued_at`` NULL).
"""

from __future__ import annotations

import logging

from core import batches, delivery, feed
from core.db import get_sessionmaker, session_scope
from core.queue import JobQueue
from core.settings import Settings
from worker.periodic import Periodic

log = logging.getLogger(__name__)

LOCK_NAME = "feeder"


class Feeder(Periodic):
    """A daemon thread topping up the queues every ``settings.feed_interval_s``."""

    def __init__(self, settings: Settings, queue: JobQueue, *, holder: str) -> None:
        super().__init__(settings.feed_interval_s, name="feeder")
        self.settings = settings
        self.queue = queue
        self.holder = holder
        self._url = settings.resolved_database_url

    def tick(self) -> object:
        return self.feed_once()

    def feed_once(self) -> dict[str, int]:
        """One top-up of every queue, if this process holds the lock; what it sent."""
        ttl = max(self.settings.feed_interval_s * 10, 5.0)
        with session_scope(self._url) as session:
            if not delivery.acquire_lock(session, LOCK_NAME, holder=self.holder, ttl_s=ttl):
                return {}
        factory = get_sessionmaker(self._url)
        sent = feed.feed_once(factory, self.queue, self.settings)
        # Batches whose jobs are all final are finalized here, within a feed
        # interval of their last job (cheap: their counts are kept, core.tally).
        finalized = batches.finalize_due(factory)
        if sent or finalized:
            log.debug("fed %s; %d batches finalized", sent, finalized)
        return sent
