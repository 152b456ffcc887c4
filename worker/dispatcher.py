"""The webhook dispatcher: a daemon thread in each worker process that sends due
webhook deliveries (see :mod:`core.webhooks` for the outbox and the claim).

Every process runs one; they need no lock between them, because each claim is a
conditional UPDATE that leases the rows it takes. Sends run on a pool of
``GENQ_WEBHOOK_SENDERS`` threads and the dispatcher never waits for them: it
claims only as many rows as it has idle senders, and at most
``GENQ_WEBHOOK_PER_HOST`` go to one host at once (:mod:`core.webhook_pacing`),
so a slow receiver holds a few senders for at most one attempt's deadline while
other owners' webhooks go on. Where POSTs may go is :mod:`core.egress`'s policy.
Now and then it also gives up deliveries older than ``GENQ_WEBHOOK_MAX_AGE_S``
and deletes finished ones older than the retention age.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from core import webhook_pacing, webhook_payloads, webhooks
from core.db import session_scope
from core.egress import EgressTransport
from core.settings import Settings

log = logging.getLogger(__name__)

PURGE_EVERY_S = 3600.0
GIVE_UP_EVERY_S = 60.0


class Dispatcher:
    """Sends due webhooks every ``settings.webhook_poll_s`` until stopped.

    ``transport`` replaces the egress-checked one (tests use a fake transport).
    """

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self._url = settings.resolved_database_url
        if transport is None:
            transport = EgressTransport(settings.webhook_allow)
        self._client = httpx.Client(timeout=settings.webhook_timeout_s, transport=transport)
        self._senders = settings.webhook_senders
        self._pool = ThreadPoolExecutor(
            max_workers=self._senders, thread_name_prefix="genq-webhook"
        )
        self._hosts = webhook_pacing.HostSlots(settings.webhook_per_host)
        self._in_flight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_purge = time.monotonic()
        self._last_give_up = 0.0
        self._thread = threading.Thread(target=self._loop, name="genq-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; POSTs in flight finish (their claims would expire anyway)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.webhook_poll_s):
            try:
                while self.dispatch_once() and self.idle_senders() and not self._stop.is_set():
                    pass  # a backlog: take the next rows at once
                self._now_and_then()
            except Exception:  # a database outage: the rows wait, try again next interval
                log.warning("webhook dispatch failed; retrying next interval", exc_info=True)

    def idle_senders(self) -> int:
        with self._lock:
            return self._senders - len(self._in_flight)

    def dispatch_once(self) -> int:
        """Claim as many due deliveries as there are idle senders and start sending
        them (without waiting); returns how many were claimed."""
        free = self.idle_senders()
        if free <= 0:
            return 0
        with session_scope(self._url) as session:
            claims = webhooks.claim_due(
                session, limit=free, lease_s=webhooks.lease_s(self.settings)
            )
        for claimed in claims:
            future = self._pool.submit(self._send, claimed)
            with self._lock:
                self._in_flight.add(future)
            future.add_done_callback(self._done)
        return len(claims)

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until no send is in flight (tests, shutdown); False on timeout."""
        end = time.monotonic() + timeout_s
        while self.idle_senders() < self._senders:
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            # That row is retried once its claim's lease runs out.
            log.warning("webhook delivery failed", exc_info=exc)

    def _send(self, claimed: webhooks.Claimed) -> None:
        host = webhook_pacing.host_of(claimed.url)
        if not self._hosts.take(host):
            with session_scope(self._url) as session:
                webhook_pacing.unclaim(session, claimed)
            return
        try:
            webhooks.deliver(
                self._url, self._client, claimed, self.settings, webhook_payloads.build
            )
        finally:
            self._hosts.give(host)

    def _now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._last_give_up >= GIVE_UP_EVERY_S:
            self._last_give_up = now
            with session_scope(self._url) as session:
                stale = webhook_pacing.give_up_stale(
                    session, max_age_s=self.settings.webhook_max_age_s
                )
            if stale:
                log.warning("gave up %d webhook deliveries past their max age", stale)
        if now - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = now
        with session_scope(self._url) as session:
            purged = webhooks.purge(session, older_than_days=self.settings.retention_days)
        if purged:
            log.info("purged %d old webhook deliveries", purged)
