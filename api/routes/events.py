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
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import OwnerDep, SessionDep, StreamsDep
from api.streaming import MAX_STREAM_S, HeldStream, follow
from core import jobs
from core.db import get_sessionmaker
from core.errors import NotFoundError
from core.models import LOCAL_OWNER
from core.schemas import JobRead

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def sse(event: str, data: Any) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclasses.dataclass
class JobEvents:
    """Turns successive snapshots of a job into the events between them."""

    job_id: str = ""
    status: str | None = None
    text: str = ""
    finished: bool = False

    def start(self, first: JobRead) -> list[str]:
        """The job as it is first; then, for a stream joined mid-run (or after the
        end), the text so far as one token event, so that the deltas a client
        concatenates always add up to the output, whenever it joined."""
        self.job_id, self.status = first.id, first.status
        return [sse("status", first.model_dump(mode="json")), *self.update(first)]

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
            self.finished = True
        return events

    def missing(self) -> list[str]:
        self.finished = True
        return [sse("error", {"code": "not_found", "message": f"job {self.job_id} was deleted"})]

    def timeout(self, last: JobRead) -> list[str]:
        self.finished = True
        return [sse("timeout", last.model_dump(mode="json"))]

    def failed(self) -> list[str]:
        self.finished = True
        message = f"the stream could not read job {self.job_id}; it goes on"
        return [sse("error", {"code": "internal_error", "message": message})]


def _read(database_url: str, job_id: str) -> JobRead | None:
    with get_sessionmaker(database_url)() as session:
        try:
            return jobs.view(session, jobs.get_job(session, job_id))
        except NotFoundError:  # deleted meanwhile (retention)
            return None


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

    async def release() -> None:
        streams.release(tenant)

    events = follow(request, JobEvents(), first, lambda: _read(database_url, first.id), max_s=max_s)
    return HeldStream(events, release)
