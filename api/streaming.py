"""Server-sent event streams that follow a job row, read from SQL.

Shared by ``/v1/jobs/{id}/events`` and the streamed ``/v1/completions`` and
``/v1/chat/completions``: :func:`follow` polls the row with a fresh short session
each time (no connection is held between polls) and hands each snapshot to a
:class:`Follower`, which turns it into events in its own format; :class:`HeldStream`
runs a closing callback (the owner's stream slot given back, and more) however
the stream ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

POLL_S = 0.2
"""How often the job row is read."""
MAX_STREAM_S = 3600.0
"""The longest a stream stays open; a client may reconnect."""
KEEPALIVE_S = 15.0
"""A comment line this often keeps proxies from closing a quiet stream."""
KEEPALIVE = ": keep-alive\n\n"

log = logging.getLogger(__name__)

Snapshot = TypeVar("Snapshot", contravariant=True)


class Follower(Protocol[Snapshot]):
    """Turns successive snapshots of a job into events (SSE text).

    ``finished`` becomes true once the stream has said all it will: the job ended,
    was deleted, or the stream reached its maximum duration.
    """

    finished: bool

    def start(self, first: Snapshot) -> list[str]:
        """The events that open the stream, given the job as it is first."""
        ...

    def update(self, snapshot: Snapshot) -> list[str]:
        """The events that take the client from the last snapshot to ``snapshot``."""
        ...

    def missing(self) -> list[str]:
        """The events that end the stream of a job deleted meanwhile."""
        ...

    def timeout(self, last: Snapshot) -> list[str]:
        """The events that end the stream at its maximum duration."""
        ...

    def failed(self) -> list[str]:
        """The events that end the stream when the job could not be read (the
        server's fault, e.g. its database went away): the job itself goes on."""
        ...


async def follow(
    request: Request,
    follower: Follower[Snapshot],
    first: Snapshot,
    read: Callable[[], Snapshot | None],
    *,
    max_s: float = MAX_STREAM_S,
    idle_s: float | None = None,
    poll_s: float = POLL_S,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[str]:
    """The events of a job followed from ``first`` until the follower is finished,
    ``max_s`` has passed (or ``idle_s`` without an event), a read failed, or the client
    went away (then it just stops, and the follower stays unfinished). ``read`` (run in
    a thread) reads the row anew, None when it is gone."""
    for event in follower.start(first):
        yield event
    deadline = time.monotonic() + max_s
    quiet_since = news_at = time.monotonic()
    last = first
    while not follower.finished:
        now = time.monotonic()
        if now >= deadline or (idle_s is not None and now - news_at >= idle_s):
            for event in follower.timeout(last):
                yield event
            return
        await anyio.sleep(poll_s)
        if await request.is_disconnected():
            return
        try:
            snapshot = await anyio.to_thread.run_sync(read)
        except Exception:  # end the stream in its own format, not cut it off
            log.exception("an event stream could not read its job")
            for event in follower.failed():
                yield event
            return
        if snapshot is None:
            events = follower.missing()
        else:
            events = follower.update(snapshot)
            last = snapshot
        for event in events:
            yield event
        if events:
            quiet_since = news_at = time.monotonic()
        elif time.monotonic() - quiet_since >= keepalive_s:
            yield KEEPALIVE
            quiet_since = time.monotonic()


class HeldStream(StreamingResponse):
    """An event stream that runs ``on_close`` when it is done, however it ends
    (finished, timed out, or the client went away: Starlette then cancels the
    body's iteration, so a ``finally`` in the generator would not run)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # even when the server is cancelling us
                await self._on_close()
