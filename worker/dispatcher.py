"""The webhook dispatcher: a daemon thread in each worker process that sends due
webhook deliveries (see :mod:`core.webhooks` for the outbox and the claim).

Every process runs one; they need no lock between them, because each claim is a
conditional UPDATE that leases the rows it takes. A few POSTs go out at once (a
slow receiver does not hold up the others); once an hour the dispatcher also
deletes finished deliveries older than the retention age.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from core import webhook_payloads, webhooks
from core.db import session_scope
from core.settings import Settings

log = logging.getLogger(__name__)

SENDERS = 4
CLAIM_LIMIT = 16
PURGE_EVERY_S = 3600.0


class Dispatcher:
    """Sends due webhooks every ``settings.webhook_poll_s`` until stopped."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self._url = settings.resolved_database_url
        self._client = httpx.Client(
            timeout=settings.webhook_timeout_s, transport=transport, trust_env=False
        )
        self._pool = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="genq-webhook")
        self._stop = threading.Event()
        self._last_purge = time.monotonic()
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
                while self.dispatch_once() == CLAIM_LIMIT and not self._stop.is_set():
                    pass  # a backlog: take the next rows at once
                self._purge_now_and_then()
            except Exception:  # a database outage: the rows wait, try again next interval
                log.warning("webhook dispatch failed; retrying next interval", exc_info=True)

    def dispatch_once(self) -> int:
        """Claim the due deliveries (up to a limit) and send them; returns how many."""
        with session_scope(self._url) as session:
            claims = webhooks.claim_due(
                session, limit=CLAIM_LIMIT, lease_s=webhooks.lease_s(self.settings)
            )
        futures = [
            self._pool.submit(
                webhooks.deliver,
                self._url,
                self._client,
                claimed,
                self.settings,
                webhook_payloads.build,
            )
            for claimed in claims
        ]
        for future in futures:
            try:
                future.result()
            except Exception:  # that row is retried once its claim's lease runs out
                log.warning("webhook delivery failed", exc_info=True)
        return len(claims)

    def _purge_now_and_then(self) -> None:
        if time.monotonic() - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = time.monotonic()
        with session_scope(self._url) as session:
            purged = webhooks.purge(session, older_than_days=self.settings.retention_days)
        if purged:
            log.info("purged %d old webhook deliveries", purged)
