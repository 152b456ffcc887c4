"""Pacing webhook sends: how many go to one host at once, and when to stop trying.

A dispatcher sends concurrently, but a slow receiver must not take every sender:
at most ``GENQ_WEBHOOK_PER_HOST`` POSTs go to one host at a time (:class:`HostSlots`),
and a delivery claimed while its host is busy is handed back, not counted as an
attempt, to be tried again shortly (:func:`unclaim`). Whatever happens to the
attempts (a dispatcher dying mid-POST, a record that cannot be written), a
delivery still pending past ``GENQ_WEBHOOK_MAX_AGE_S`` is given up
(:func:`give_up_stale`), so no row is retried forever.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from urllib.parse import urlsplit

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.models import WebhookDelivery, utcnow
from core.webhooks import FAILED, PENDING, Claimed

BUSY_RETRY_S = 1.0
STALE_REASON = "given up: still not delivered after GENQ_WEBHOOK_MAX_AGE_S"


def host_of(url: str) -> str:
    """The host a delivery goes to (lower case, port included): what is limited."""
    parts = urlsplit(url)
    return f"{(parts.hostname or '').lower()}:{parts.port or ''}"


class HostSlots:
    """At most ``per_host`` holders per host; :meth:`take` never waits."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, host: str) -> bool:
        with self._lock:
            if self._held[host] >= self.per_host:
                return False
            self._held[host] += 1
            return True

    def give(self, host: str) -> None:
        with self._lock:
            self._held[host] -= 1
            if self._held[host] <= 0:
                del self._held[host]


def unclaim(session: Session, claimed: Claimed, *, after_s: float = BUSY_RETRY_S) -> bool:
    """Give back a claimed attempt that was not sent (its host was busy): the
    attempt does not count and the delivery is due again ``after_s`` from now.
    False if the claim was no longer ours."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claimed.id,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.attempts == claimed.attempt,
        )
        .values(
            attempts=WebhookDelivery.attempts - 1,
            next_attempt_at=utcnow() + dt.timedelta(seconds=after_s),
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def give_up_stale(session: Session, *, max_age_s: float) -> int:
    """Fail the pending deliveries written more than ``max_age_s`` ago, whatever
    their attempts did; returns how many."""
    cutoff = utcnow() - dt.timedelta(seconds=max_age_s)
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.created_at < cutoff)
        .values(status=FAILED, last_error=STALE_REASON)
    )
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count
