"""Idempotency keys: the same key and body give the same object; another body, 409.

A web app retrying its own request (a timeout, a reload) sends the same
``Idempotency-Key`` and gets the object the first request made, not a second
one. The record is written in the transaction that creates the object, so the
two exist together or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.errors import ConflictError
from core.models import IdempotencyRecord, utcnow

MAX_KEY_LENGTH = 255


class IdempotencyConflictError(ConflictError):
    """The key was used before with a different request."""

    code = "idempotency_key_reused"

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used with a different request body or endpoint",
            param="Idempotency-Key",
        )
        self.key = key


def fingerprint(endpoint: str, body: Any) -> str:
    """A stable hash of what was asked: the endpoint and the canonical JSON body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{endpoint}\n{canonical}".encode()).hexdigest()


def replayed(session: Session, *, owner: str, key: str, request_hash: str) -> str | None:
    """The id of the object this key made before (None if new); raises on a mismatch."""
    record = session.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.owner == owner, IdempotencyRecord.key == key
        )
    )
    if record is None:
        return None
    if record.request_hash != request_hash:
        raise IdempotencyConflictError(key)
    return record.resource_id


def remember(
    session: Session, *, owner: str, key: str, endpoint: str, request_hash: str, resource_id: str
) -> None:
    """Record what this key made (in the caller's transaction)."""
    session.add(
        IdempotencyRecord(
            owner=owner,
            key=key,
            endpoint=endpoint,
            request_hash=request_hash,
            resource_id=resource_id,
            created_at=utcnow(),
        )
    )


@dataclasses.dataclass(frozen=True)
class IdempotentRequest:
    """One create request that carried an ``Idempotency-Key``.

    Call :meth:`earlier` first (the id of the object a previous request with this
    key made, or None); after creating a new object, :meth:`remember` it in the
    same transaction.
    """

    session: Session
    owner: str
    key: str
    endpoint: str
    request_hash: str

    @classmethod
    def begin(
        cls, session: Session, *, owner: str, key: str | None, endpoint: str, body: Any
    ) -> IdempotentRequest | None:
        """The request for ``key`` (None when the client sent no key)."""
        if key is None:
            return None
        return cls(session, owner, key, endpoint, fingerprint(endpoint, body))

    def earlier(self) -> str | None:
        """The id this key made before; raises IdempotencyConflictError on a mismatch."""
        return replayed(
            self.session, owner=self.owner, key=self.key, request_hash=self.request_hash
        )

    def forget(self) -> None:
        """Drop this key's record (its object was deleted: a retry makes a new one)."""
        self.session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.owner == self.owner, IdempotencyRecord.key == self.key
            )
        )

    def remember(self, resource_id: str) -> None:
        """Record that this key made ``resource_id`` (in the caller's transaction)."""
        remember(
            self.session,
            owner=self.owner,
            key=self.key,
            endpoint=self.endpoint,
            request_hash=self.request_hash,
            resource_id=resource_id,
        )


def purge(session: Session, *, older_than_days: float) -> int:
    """Delete records older than the retention age (their objects are purged too)."""
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < cutoff))
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count
