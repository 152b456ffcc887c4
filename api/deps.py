"""Request dependencies: settings, a database session and the queue, from app state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import APIError
from core import keys, quotas
from core.db import get_sessionmaker
from core.models import LOCAL_OWNER
from core.queue import JobQueue
from core.settings import Settings


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    settings = get_app_settings(request)
    with get_sessionmaker(settings.resolved_database_url)() as session:
        yield session


def get_job_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
QueueDep = Annotated[JobQueue, Depends(get_job_queue)]


bearer = HTTPBearer(auto_error=False, description="an API key made by `genq keys create`")


def get_caller(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> keys.Caller | None:
    """Who is calling (the bearer key's owner and permissions), or None (anyone) with
    auth off; over the owner's request rate, or from an address that sent too many
    wrong keys (checked before the key is), a 429 (core.quotas)."""
    if not settings.require_auth:
        caller = None
    elif credentials is None or not credentials.credentials.strip():
        raise APIError(401, "missing_api_key", "send an API key as 'Authorization: Bearer <key>'")
    else:
        # Behind a reverse proxy this is the proxy's address unless uvicorn trusts
        # its X-Forwarded-For (FORWARDED_ALLOW_IPS; 127.0.0.1 by default).
        address = request.client.host if request.client else "unknown"
        failures: quotas.AuthFailures = request.app.state.auth_failures
        failures.check(address)
        caller = keys.caller_of(session, credentials.credentials.strip())
        if caller is None:
            failures.failed(address)
            raise APIError(401, "invalid_api_key", "the API key is wrong or revoked")
    limiter: quotas.RateLimiter = request.app.state.rate_limiter
    limiter.check(caller.owner if caller else LOCAL_OWNER)
    return caller


CallerDep = Annotated[keys.Caller | None, Depends(get_caller)]


def get_owner(caller: CallerDep) -> str | None:
    """Who is calling: the owner of the bearer key, or None (anyone) with auth off."""
    return caller.owner if caller else None


OwnerDep = Annotated[str | None, Depends(get_owner)]


def may_use_high(caller: keys.Caller | None) -> bool:
    """Whether the caller may submit priority ``high`` (anyone, with auth off)."""
    return caller is None or caller.high_priority


def get_streams(request: Request) -> quotas.StreamSlots:
    streams: quotas.StreamSlots = request.app.state.streams
    return streams


StreamsDep = Annotated[quotas.StreamSlots, Depends(get_streams)]


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="retrying with the same key and body returns the same object",
    ),
]
