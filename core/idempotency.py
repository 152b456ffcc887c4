"""Idempotency keys: the same key and body give the same object; another body, 409.

A web app retrying its own request (a timeout, a reload) sends the same
``Idempotency-Key`` and gets the object the first request made, not a second
one. The record is written in the transaction that creates the object, so the
two exist together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import IdempotencyRecord, utcnow

MAX_KEY_LENGTH = 255


class IdempotencyConflictError(Exception):
    """The key was used before with a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used with a different request body or endpoint"
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


def replay_or_remember(
    session: Session,
    *,
    owner: str,
    key: str,
    endpoint: str,
    request_hash: str,
    resource_id: str,
) -> str | None:
    """Before committing a new object: if ``key`` made one already, roll the new one
    back and return the earlier id; else record the key with the new id (None)."""
    earlier = replayed(session, owner=owner, key=key, request_hash=request_hash)
    if earlier is not None:
        session.rollback()
        return earlier
    remember(
        session,
        owner=owner,
        key=key,
        endpoint=endpoint,
        request_hash=request_hash,
        resource_id=resource_id,
    )
    return None
