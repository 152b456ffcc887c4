"""API keys: created, listed, revoked; stored as SHA-256 hashes, shown once.

Keys are 256-bit random tokens, so a plain SHA-256 is enough to store them
(a slow password hash guards low-entropy secrets, which these are not).

Each key also has a webhook secret, which signs the webhooks of its owner's jobs
(core.webhooks). It is stored as is, since signing needs it, and can be shown again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import text
from core.models import ApiKey, utcnow
from core.webhooks import new_webhook_secret

KEY_PREFIX = "genq_"


class KeyNotFoundError(LookupError):
    """No such key."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_tenant_id() -> str:
    """A fresh owner: keys share one only when created for the same ``--owner``."""
    return f"ten_{secrets.token_hex(8)}"


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a live key speaks for, and what it may do."""

    owner: str
    high_priority: bool


def create_key(
    session: Session,
    *,
    name: str,
    owner: str | None = None,
    callback_url: str | None = None,
    high_priority: bool = False,
) -> tuple[ApiKey, str]:
    """A new key for ``owner`` (default: a new tenant of its own, whatever the name),
    with a webhook secret, an optional default ``callback_url`` for the owner's jobs
    and batches, and whether it may submit priority ``high``; returns the row and
    the key's secret."""
    owner = owner or new_tenant_id()
    for param, value in (("name", name), ("owner", owner)):
        text.check(value, param)
        if not 0 < len(value) <= 255:
            raise text.UnstorableTextError(param, "must be 1 to 255 characters")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=f"key_{secrets.token_hex(8)}",
        name=name,
        owner=owner,
        high_priority=high_priority,
        prefix=secret[: len(KEY_PREFIX) + 4],
        secret_hash=_hash(secret),
        created_at=utcnow(),
        callback_url=callback_url,
        webhook_secret=new_webhook_secret(),
    )
    session.add(key)
    session.flush()
    return key, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def get_key(session: Session, key_id: str) -> ApiKey:
    """The key; one made before webhooks existed gets its webhook secret now."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyNotFoundError(key_id)
    if key.webhook_secret is None:
        key.webhook_secret = new_webhook_secret()
    return key


def revoke_key(session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyNotFoundError(key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def caller_of(session: Session, secret: str) -> Caller | None:
    """Who a live key with this secret speaks for, or None."""
    row = session.execute(
        select(ApiKey.owner, ApiKey.high_priority).where(
            ApiKey.secret_hash == _hash(secret), ApiKey.revoked_at.is_(None)
        )
    ).one_or_none()
    return Caller(row[0], bool(row[1])) if row else None


def owner_of(session: Session, secret: str) -> str | None:
    """The owner of a live key with this secret, or None."""
    caller = caller_of(session, secret)
    return caller.owner if caller else None
