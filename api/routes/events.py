"""/v1/jobs/{id}/events: a job's life as server-sent events, read from SQL.

Workers write progress to the job row (partial text and token count) every
``GENQ_PROGRESS_INTERVAL_S``; this stream polls the row with a fresh short
session each time (no connection is held between polls) and turns the changes
into events:

- ``status``: the job (``JobRead``), first at once, then on each status change;
- ``token``: ``{"delta", "tokens"}``: the text generated since the last event and
  the tokens so far (``"reset": true`` when the partial text was dropped, as when
  a job is handed back to the queue, and ``delta`` is then the whole text); the
  first one, right after the first status, holds all the text generated before
  the stream was joined;
- ``done``: the final job; the stream then closes;
- ``timeout``: the job, when the stream reached its maximum duration first.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.deps import OwnerDep, SessionDep, StreamsDep
from core import jobs
from core.db import get_sessionmaker
from core.errors import NotFoundError
from core.models import LOCAL_OWNER
from core.schemas import JobRead

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_S = 0.2
"""How often the job row is read."""
MAX_STREAM_S = 3600.0
"""The longest a stream stays open; a client may reconnect."""
KEEPALIVE_S = 15.0
"""A comment line this often keeps proxies from closing a quiet stream."""


def sse(event: str, data: Any) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclasses.dataclass
class JobEvents:
    """Turns successive snapshots of a job into the events between them."""

    status: str | None = None
    text: str = ""

    def update(self, job: JobRead) -> list[str]:
        """The events that take a client from the last snapshot to ``job``."""
        events: list[str] = []
        text = job.output or ""
        if text != self.text:
            reset = not text.startswith(self.text)
            delta = text if reset else text[len(self.text) :]
            token: dict[str, Any] = {"delta": delta, "tokens": job.usage.completion_tokens}
            if reset:
                token["reset"] = True
            events.append(sse("token", token))
            self.text = text
        if job.status != self.status:
            events.append(sse("status", job.model_dump(mode="json")))
            self.status = job.status
        if job.status.is_final:
            events.append(sse("done", job.model_dump(mode="json")))
        return events


def _read(database_url: str, job_id: str) -> JobRead | None:
    with get_sessionmaker(database_url)() as session:
        try:
            return jobs.view(session, jobs.get_job(session, job_id))
        except NotFoundError:  # deleted meanwhile (retention)
            return None


async def _stream(
    request: Request, database_url: str, first: JobRead, max_s: float
) -> AsyncIterator[str]:
    state = JobEvents()
    # The job as it is first; then, for a stream joined mid-run (or after the
    # end), the text so far as one token event, so that the deltas a client
    # concatenates always add up to the output, whenever it joined.
    state.status = first.status
    yield sse("status", first.model_dump(mode="json"))
    for event in state.update(first):
        yield event
    if first.status.is_final:
        return
    deadline = time.monotonic() + max_s
    quiet_since = time.monotonic()
    job = first
    while time.monotonic() < deadline:
        await anyio.sleep(POLL_S)
        if await request.is_disconnected():
            return
        latest = await anyio.to_thread.run_sync(_read, database_url, first.id)
        if latest is None:
            yield sse("error", {"code": "not_found", "message": f"job {first.id} was deleted"})
            return
        job = latest
        events = state.update(job)
        for event in events:
            yield event
        if job.status.is_final:
            return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
    yield sse("timeout", job.model_dump(mode="json"))


class _HeldStream(StreamingResponse):
    """A streaming response that gives the owner's stream slot back when it is done,
    however it ends (finished, timed out, or the client went away: Starlette then
    cancels the body's iteration, so a ``finally`` in the generator would not run)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get("/{job_id}/events", response_class=StreamingResponse)
def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    owner: OwnerDep,
    streams: StreamsDep,
    max_s: Annotated[
        float, Query(gt=0, le=MAX_STREAM_S, description="close the stream after this long")
    ] = MAX_STREAM_S,
) -> StreamingResponse:
    """Stream the job's status changes and new text as server-sent events, until it ends."""
    first = jobs.view(session, jobs.get_job(session, job_id, owner=owner))
    # The request's session is not needed while streaming: give its connection back now.
    session.close()
    database_url = request.app.state.settings.resolved_database_url
    tenant = owner or LOCAL_OWNER
    streams.acquire(tenant)  # a 429 past the owner's open streams; released at the end
    return _HeldStream(
        _stream(request, database_url, first, max_s), lambda: streams.release(tenant)
    )
