"""Webhooks: signed POSTs of a job or batch when it reaches a final status.

The delivery is an outbox row (:class:`core.models.WebhookDelivery`) written in
the same transaction as the final status, so a webhook is never lost to a crash
between the two. Each worker process runs a dispatcher (``worker/dispatcher.py``)
that claims due rows with a conditional UPDATE that also pushes their
``next_attempt_at`` forward by a lease, so two dispatchers never send the same
attempt at once; it POSTs, records the attempt, and on failure reschedules with
exponential backoff and jitter until ``webhook_max_age_s`` has passed since the
row was written, then gives up (``failed``).

The body is built **at send time** from the current row: it is the object as
``GET /v1/jobs/{id}`` (or ``GET /v1/batches/{id}``) returns it then. Final
statuses never change, but a job cancelled while running gets its partial output
stored a moment after the cancel; building late includes it, and keeps the
outbox row small (no copy of a long output per row).

Every request carries::

    Genq-Event: job.succeeded            (job.failed, job.cancelled, batch.completed, ...)
    Genq-Delivery: whd_...               (the same on every retry: dedupe on it)
    Genq-Signature: t=1767225600,v1=5f0c...   (hex HMAC-SHA256 of f"{t}.{body}")

with one ``v1`` per live API key of the owner (so rotating keys never breaks a
receiver), or the server's ``GENQ_WEBHOOK_SECRET`` when the owner has none; and
the same signatures per the Standard Webhooks spec (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``). Where the POST may go is
:mod:`core.egress`'s policy; an attempt has one total deadline and its record
keeps the status code and a reason of genq's own, never the receiver's body.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx
from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from core import egress
from core.db import session_scope
from core.models import ApiKey, Batch, Job, WebhookDelivery, utcnow
from core.settings import Settings
from core.standard_webhooks import standard_signature
from core.text import storable

log = logging.getLogger(__name__)

EVENT_HEADER = "Genq-Event"
DELIVERY_HEADER = "Genq-Delivery"
SIGNATURE_HEADER = "Genq-Signature"
SECRET_PREFIX = "whsec_"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
USER_AGENT = "genq-webhooks/1"


# --- signing ---------------------------------------------------------------------------


def new_webhook_secret() -> str:
    """A fresh signing secret (192 random bits), shown to the key's owner."""
    return SECRET_PREFIX + secrets.token_hex(24)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` with ``secret``."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secrets_: Sequence[str], body: bytes, timestamp: int) -> str:
    """``t=<timestamp>,v1=<sig>[,v1=<sig>...]``: one signature per secret."""
    return ",".join([f"t={timestamp}", *(f"v1={sign(s, timestamp, body)}" for s in secrets_)])


def verify(
    secret: str, header: str, body: bytes, tolerance_s: float = 300, *, now: float | None = None
) -> bool:
    """Whether ``header`` (a ``Genq-Signature`` value) signs ``body`` with ``secret``
    and its timestamp is within ``tolerance_s`` of now (which stops replays).

    Self-contained (hashlib, hmac, time) so that receivers can copy it.
    """
    timestamp, signatures = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return any(hmac.compare_digest(expected.hexdigest(), s) for s in signatures)


def backoff_s(
    attempt: int, *, base_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """The wait after failed attempt number ``attempt`` (1, 2, ...): ``base * 2**(n-1)``
    capped at ``max_s``, of which the upper half is random ("equal jitter"), so that
    receivers coming back from an outage are not hit by every retry at once."""
    ceiling = min(max_s, base_s * 2.0 ** min(attempt - 1, 62))
    return ceiling / 2 + ceiling / 2 * rng()


# --- the outbox: written with the final status ------------------------------------------


def delivery_id(object_id: str, event: str) -> str:
    """The id of the one delivery of ``event`` for a job or batch: derived from both,
    so a transition recorded twice (a store retried after an ambiguous commit) is
    one outbox row, and a receiver deduplicating on ``Genq-Delivery`` sees one event."""
    digest = hashlib.sha256(f"{object_id}\x00{event}".encode()).hexdigest()
    return f"whd_{digest[:32]}"


def _insert_once(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert outbox rows, skipping those whose (deterministic) id exists already."""
    dialect = session.get_bind().dialect.name
    statement: Any
    if dialect == "postgresql":
        statement = postgresql_insert(WebhookDelivery).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite_insert(WebhookDelivery).on_conflict_do_nothing()
    else:  # pragma: no cover - genq supports PostgreSQL and SQLite
        existing = set(
            session.scalars(
                select(WebhookDelivery.id).where(WebhookDelivery.id.in_([r["id"] for r in rows]))
            )
        )
        rows = [r for r in rows if r["id"] not in existing]
        statement = insert(WebhookDelivery)
    if rows:
        session.execute(statement, rows)


def default_callback(session: Session, owner: str) -> str | None:
    """The callback of the owner's newest live API key that has one."""
    url: str | None = session.scalar(
        select(ApiKey.callback_url)
        .where(ApiKey.owner == owner, ApiKey.revoked_at.is_(None), ApiKey.callback_url.is_not(None))
        .order_by(ApiKey.created_at.desc())
        .limit(1)
    )
    return url


JOB_EVENT_COLUMNS = (Job.id, Job.owner, Job.status, Job.callback_url, Job.batch_id)
"""What :func:`record_events_of` needs of each job row, in its order."""


def record_job_events(session: Session, job_ids: Iterable[str]) -> int:
    """Write the outbox rows for jobs that just reached a final status (in the
    caller's transaction); returns how many. A job is sent to its own
    ``callback_url``, else to its owner's key default; a job of a batch only to its
    own (the batch has its webhook), so a batch of 50,000 is one delivery."""
    ids = list(job_ids)
    if not ids:
        return 0
    return record_events_of(
        session, session.execute(select(*JOB_EVENT_COLUMNS).where(Job.id.in_(ids))).all()
    )


def record_events_of(session: Session, rows: Iterable[Sequence[Any]]) -> int:
    """:func:`record_job_events` for job rows already read (:data:`JOB_EVENT_COLUMNS`)."""
    defaults: dict[str, str | None] = {}
    now = utcnow()
    values = []
    for job_id, owner, status, url, batch_id in rows:
        if url is None and batch_id is None:
            if owner not in defaults:
                defaults[owner] = default_callback(session, owner)
            url = defaults[owner]
        if url is not None:
            values.append(
                _outbox_row(owner, f"job.{status}", url, now, job_id=job_id, batch_id=None)
            )
    if values:
        _insert_once(session, values)
    return len(values)


def record_batch_event(session: Session, batch: Batch) -> bool:
    """Write the outbox row for a batch that just reached a final status (in the
    caller's transaction); False when neither the batch nor its owner has a callback."""
    url = batch.callback_url or default_callback(session, batch.owner)
    if url is None:
        return False
    row = _outbox_row(batch.owner, f"batch.{batch.status}", url, utcnow(), None, batch.id)
    _insert_once(session, [row])
    return True


def _outbox_row(
    owner: str, event: str, url: str, now: dt.datetime, job_id: str | None, batch_id: str | None
) -> dict[str, Any]:
    return {
        "id": delivery_id(job_id or batch_id or "", event),
        "owner": owner,
        "job_id": job_id,
        "batch_id": batch_id,
        "event": event,
        "url": url,
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


# --- sending: claim, build, POST, record ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claimed:
    """One attempt of a delivery, held by this dispatcher until ``attempt`` changes."""

    id: str
    attempt: int
    created_at: dt.datetime
    url: str = ""  # where it goes (the dispatcher limits sends per host)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What to POST for a claimed attempt; ``body`` None if the object is gone."""

    claimed: Claimed
    url: str
    event: str
    body: bytes | None
    secrets: list[str]

    def headers(self, timestamp: int) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_HEADER: self.event,
            DELIVERY_HEADER: self.claimed.id,
        }
        if self.secrets and self.body is not None:
            headers[SIGNATURE_HEADER] = signature_header(self.secrets, self.body, timestamp)
            # The same, the Standard Webhooks way (standardwebhooks.com), so that
            # receivers can verify with an off-the-shelf library.
            headers["webhook-id"] = self.claimed.id
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = standard_signature(
                self.secrets, self.claimed.id, timestamp, self.body
            )
        return headers


@dataclasses.dataclass(frozen=True)
class Attempt:
    """How one POST went: a status code, or an error before any response."""

    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def claim_due(session: Session, *, limit: int, lease_s: float) -> list[Claimed]:
    """Take up to ``limit`` pending deliveries that are due: their attempt count goes
    up and their next attempt moves ``lease_s`` ahead, so no other dispatcher takes
    them meanwhile (and, if this one dies, they are retried after the lease).

    On PostgreSQL the candidates are locked with SKIP LOCKED, so concurrent
    dispatchers take different rows; SQLite has one writer at a time. The WHERE is
    repeated in the UPDATE, which re-checks it on the row it locks."""
    now = utcnow()
    due = (WebhookDelivery.status == PENDING) & (WebhookDelivery.next_attempt_at <= now)
    if session.scalar(select(WebhookDelivery.id).where(due).limit(1)) is None:
        return []  # the usual case: a cheap indexed read, no write lock (SQLite)
    candidates = (
        select(WebhookDelivery.id)
        .where(due)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(candidates.scalar_subquery()), due)
        .values(
            attempts=WebhookDelivery.attempts + 1,
            next_attempt_at=now + dt.timedelta(seconds=lease_s),
        )
        .returning(
            WebhookDelivery.id,
            WebhookDelivery.attempts,
            WebhookDelivery.created_at,
            WebhookDelivery.url,
        )
        .execution_options(synchronize_session=False)
    )
    return [Claimed(*row) for row in rows]


def signing_secrets(session: Session, owner: str, fallback: str | None) -> list[str]:
    """The webhook secrets of all the owner's live keys, oldest first (a receiver
    holding any one of them verifies); else ``fallback``."""
    found = list(
        session.scalars(
            select(ApiKey.webhook_secret)
            .where(
                ApiKey.owner == owner,
                ApiKey.revoked_at.is_(None),
                ApiKey.webhook_secret.is_not(None),
            )
            .order_by(ApiKey.created_at)
        )
    )
    secrets_ = [s for s in found if s]
    return secrets_ or ([fallback] if fallback else [])


PayloadBuilder = Callable[[Session, WebhookDelivery], bytes | None]
"""Builds a delivery's JSON body from the rows as they are now (None: the object is
gone). Passed in by the caller (``core.webhook_payloads.build``), so this lower
layer never imports the API's views of jobs and batches."""


def prepare(
    session: Session, claimed: Claimed, settings: Settings, build: PayloadBuilder
) -> Prepared | None:
    """The request for a claimed attempt, built from the rows as they are now; None
    if the delivery is gone or the claim lapsed (another dispatcher took it over
    while this one could not reach the database), so it is not POSTed twice at once.
    A claim can still lapse during the POST: delivery stays at least once."""
    delivery = session.get(WebhookDelivery, claimed.id)
    if delivery is None or delivery.status != PENDING or delivery.attempts != claimed.attempt:
        return None
    return Prepared(
        claimed=claimed,
        url=delivery.url,
        event=delivery.event,
        body=build(session, delivery),
        secrets=signing_secrets(session, delivery.owner, settings.webhook_secret),
    )


def post(client: httpx.Client, prepared: Prepared, *, timeout_s: float = 10.0) -> Attempt:
    """POST a prepared delivery within one total deadline of ``timeout_s``. Redirects
    are not followed (they count as failures) and no byte of the answer's body is
    read: only its status code matters, and a receiver's body is never stored."""
    if prepared.body is None:
        return Attempt(None, "the object no longer exists")
    try:
        with (
            egress.deadline(timeout_s),
            client.stream(
                "POST",
                prepared.url,
                content=prepared.body,
                headers=prepared.headers(int(time.time())),
                follow_redirects=False,
                timeout=timeout_s,
            ) as response,
        ):
            code = response.status_code
    except (httpx.HTTPError, UnicodeError, ValueError) as exc:
        # UnicodeError/ValueError: a URL no client can send to; recorded as the
        # attempt's failure like any other, so the delivery is retried and given up.
        return Attempt(None, storable(f"{type(exc).__name__}: {exc}", 300))
    if 200 <= code < 300:
        return Attempt(code, None)
    return Attempt(code, f"HTTP {code}: the receiver did not answer 2xx")


def record_attempt(
    session: Session,
    claimed: Claimed,
    attempt: Attempt,
    settings: Settings,
    *,
    gone: bool = False,
    rng: Callable[[], float] = random.random,
) -> str | None:
    """Store how the attempt went: ``delivered`` on 2xx, else ``pending`` again with
    the next attempt after a backoff, or ``failed`` once that would fall past the
    retry window (or the object is ``gone``). None if the claim was lost (its lease
    ran out and another dispatcher took the delivery)."""
    now = utcnow()
    values: dict[str, Any] = {
        "last_status_code": attempt.status_code,
        "last_error": None if attempt.error is None else storable(attempt.error),
    }
    if attempt.ok:
        values.update(status=DELIVERED, delivered_at=now)
    else:
        wait = backoff_s(
            claimed.attempt,
            base_s=settings.webhook_backoff_base_s,
            max_s=settings.webhook_backoff_max_s,
            rng=rng,
        )
        next_at = now + dt.timedelta(seconds=wait)
        deadline = claimed.created_at + dt.timedelta(seconds=settings.webhook_max_age_s)
        if gone or next_at > deadline:
            values.update(status=FAILED)
        else:
            values.update(status=PENDING, next_attempt_at=next_at)
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claimed.id,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.attempts == claimed.attempt,
        )
        .values(**values)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    status: str = values["status"]
    return status


def purge(session: Session, *, older_than_days: float) -> int:
    """Delete delivered and failed deliveries older than the retention age."""
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    result = session.execute(
        delete(WebhookDelivery).where(
            WebhookDelivery.status.in_((DELIVERED, FAILED)), WebhookDelivery.created_at < cutoff
        )
    )
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


def lease_s(settings: Settings) -> float:
    """How long a claimed attempt is held: longer than a POST can take (one total
    deadline, name resolution included, :func:`post`) plus the database writes."""
    return settings.webhook_timeout_s * 2 + 30


def deliver(
    database_url: str,
    client: httpx.Client,
    claimed: Claimed,
    settings: Settings,
    build: PayloadBuilder,
) -> str | None:
    """Build, POST and record one claimed attempt; returns the delivery's new status
    (None if it vanished or the claim was lost). No transaction is open during the POST."""
    with session_scope(database_url) as session:
        prepared = prepare(session, claimed, settings, build)
    if prepared is None:
        return None
    if prepared.body is not None and not prepared.secrets:
        log.warning("webhook %s sent unsigned: no key secret nor GENQ_WEBHOOK_SECRET", claimed.id)
    attempt = post(client, prepared, timeout_s=settings.webhook_timeout_s)
    with session_scope(database_url) as session:
        status = record_attempt(session, claimed, attempt, settings, gone=prepared.body is None)
    log.info(
        "webhook %s %s attempt %d: %s -> %s",
        claimed.id,
        prepared.event,
        claimed.attempt,
        attempt.status_code or attempt.error,
        status,
    )
    return status
