"""POST /v1/completions and /v1/chat/completions: OpenAI's calls, riding the same
queue as any job.

The request becomes a job; the call waits for it (polling SQL, without holding a
thread while it sleeps) for up to ``GENQ_COMPLETION_WAIT_S`` and answers with the
completion object, or 202 with the job (``Location: /v1/jobs/{id}``) when the wait
runs out. With ``stream: true`` it answers OpenAI's event stream instead
(core/openai_stream.py), for as long. A client that disconnects while waiting or
streaming cancels its job, unless it sent an ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session, load_only
from starlette.concurrency import run_in_threadpool

from api.deps import IdempotencyKeyHeader, OwnerDep, QueueDep, SessionDep, SettingsDep, StreamsDep
from api.errors import APIError, error_body
from api.streaming import HeldStream, follow
from core import jobstate, submit
from core.chat import template_messages
from core.db import get_sessionmaker
from core.models import LOCAL_OWNER, Job
from core.openai_format import (
    ParsedRequest,
    RequestError,
    error_status,
    parse_chat,
    parse_completion,
    response_object,
)
from core.openai_stream import ChunkStream
from core.queue import JobQueue
from core.quotas import StreamSlots
from core.schemas import JobRead
from core.settings import Settings
from core.status import JobStatus

router = APIRouter(tags=["completions"])

POLL_MIN_S = 0.05
POLL_MAX_S = 0.5


def _read(database_url: str, job_id: str) -> Job | None:
    with get_sessionmaker(database_url)() as session:
        return session.get(Job, job_id)


# What a stream's polls read: not the prompt and messages, the row's largest columns
# (a prompt of up to MAX_PROMPT_CHARS, messages up to the request body), which the
# stream reads once, at its start.
_POLLED = (
    Job.id,
    Job.custom_id,
    Job.status,
    Job.model,
    Job.params,
    Job.outputs,
    Job.finish_reasons,
    Job.logprobs,
    Job.prompt_tokens,
    Job.completion_tokens,
    Job.error_code,
    Job.error_message,
    Job.created_at,
    Job.finished_at,
)


def _poll(database_url: str, job_id: str) -> Job | None:
    """The job as a stream follows it (reading another column raises)."""
    with get_sessionmaker(database_url)() as session:
        return session.get(Job, job_id, options=[load_only(*_POLLED, raiseload=True)])


def _cancel(database_url: str, job_id: str) -> None:
    with get_sessionmaker(database_url)() as session:
        try:
            jobstate.cancel_job(session, job_id)
            session.commit()
        except jobstate.JobConflictError:
            pass


@router.post("/v1/completions")
async def create_completion(
    request: Request,
    body: Annotated[dict[str, Any], Body(description="OpenAI's completion request")],
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    owner: OwnerDep,
    streams: StreamsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Generate a completion: the body and the answer (or its stream) are OpenAI's.
    With an ``Idempotency-Key``, a retry with the same body waits on the same job."""
    try:
        parsed, params = parse_completion(
            body, models=submit.served_models(session, settings), may_stream=True
        )
    except RequestError as exc:
        raise _api_error(exc) from exc
    call = _Call(request, session, settings, queue, owner, streams, idempotency_key, body)
    job_request = ParsedRequest(None, parsed.prompt, parsed.model, params)
    if parsed.stream:
        return await _submit_and_stream(call, job_request, include_usage=parsed.include_usage())
    return await _submit_and_wait(call, job_request)


@router.post("/v1/chat/completions")
async def create_chat_completion(
    request: Request,
    body: Annotated[dict[str, Any], Body(description="OpenAI's chat completion request")],
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    owner: OwnerDep,
    streams: StreamsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Answer a conversation: the body and the answer (or its stream) are OpenAI's.
    The model's own chat template renders the messages (on the worker)."""
    try:
        parsed, params = parse_chat(
            body,
            models=submit.served_models(session, settings),
            without_template=submit.models_without_chat_template(session, settings),
            may_stream=True,
        )
    except RequestError as exc:
        raise _api_error(exc) from exc
    call = _Call(request, session, settings, queue, owner, streams, idempotency_key, body)
    messages = template_messages(parsed.messages)
    job_request = ParsedRequest(None, "", parsed.model, params, messages)
    if parsed.stream:
        return await _submit_and_stream(call, job_request, include_usage=parsed.include_usage())
    return await _submit_and_wait(call, job_request)


def _api_error(exc: RequestError) -> APIError:
    status = {"model_not_found": 404, "invalid_schema": 422, "model_without_chat_template": 422}
    return APIError(status.get(exc.code, 400), exc.code, exc.message, exc.param)


@dataclasses.dataclass(frozen=True)
class _Call:
    """What a completion call brings besides its request."""

    request: Request
    session: Session
    settings: Settings
    queue: JobQueue
    owner: str | None
    streams: StreamSlots
    idempotency_key: str | None
    body: dict[str, Any]

    @property
    def tenant(self) -> str:
        return self.owner or LOCAL_OWNER

    async def submit(self, job_request: ParsedRequest) -> tuple[str, bool]:
        """Queue the job (or find the one this Idempotency-Key made): its id, and
        whether it is a replay."""
        return await run_in_threadpool(
            functools.partial(
                submit.submit_request,
                self.session,
                self.queue,
                job_request,
                settings=self.settings,
                owner=self.tenant,
                idempotency_key=self.idempotency_key,
                body=self.body,
            )
        )


async def _submit_and_wait(call: _Call, job_request: ParsedRequest) -> JSONResponse:
    """Queue the job, then answer once it is final (or 202 when the wait runs out)."""
    with call.streams.hold(call.tenant):  # a waiting completion holds a slot, like a stream
        job_id, replay = await call.submit(job_request)
        # With an Idempotency-Key the client may come back for the same job (a retry after
        # its connection dropped), so going away does not cancel it.
        answer = await _wait(
            call.request,
            call.settings.resolved_database_url,
            job_id,
            call.settings.completion_wait_s,
            cancel_on_disconnect=call.idempotency_key is None,
        )
    if replay:
        answer.headers["Idempotent-Replayed"] = "true"
    return answer


async def _submit_and_stream(
    call: _Call, job_request: ParsedRequest, *, include_usage: bool
) -> HeldStream:
    """Queue the job, then stream its text as OpenAI's chunks until it is final (or
    ``GENQ_COMPLETION_WAIT_S`` passed). Errors before the stream starts are JSON."""
    url = call.settings.resolved_database_url
    call.streams.acquire(call.tenant)  # held until the stream closes
    try:
        job_id, replay = await call.submit(job_request)
        call.session.close()  # not needed while streaming: give its connection back
        first = await run_in_threadpool(_read, url, job_id)
        if first is None:  # purged or deleted meanwhile
            raise APIError(404, "not_found", f"job {job_id} disappeared", "id")
    except BaseException:
        call.streams.release(call.tenant)
        raise
    chunks = ChunkStream(include_usage=include_usage)
    cancel_on_disconnect = call.idempotency_key is None  # as when waiting (see above)

    async def close() -> None:
        try:
            if cancel_on_disconnect and not chunks.finished:  # the client went away
                await run_in_threadpool(_cancel, url, job_id)
        finally:
            call.streams.release(call.tenant)

    events = follow(
        call.request,
        chunks,
        first,
        lambda: _poll(url, job_id),
        idle_s=call.settings.completion_wait_s,
    )
    return HeldStream(events, close, {"Idempotent-Replayed": "true"} if replay else None)


async def _wait(
    request: Request, url: str, job_id: str, wait_s: float, *, cancel_on_disconnect: bool
) -> JSONResponse:
    """The job's answer once it is final, a 202 with the job once ``wait_s`` passed,
    or 499 once the client went away (the job cancelled if ``cancel_on_disconnect``)."""
    deadline = time.monotonic() + wait_s
    delay = POLL_MIN_S
    while True:
        job = await run_in_threadpool(_read, url, job_id)
        if job is None:  # purged or deleted meanwhile
            raise APIError(404, "not_found", f"job {job_id} disappeared", "id")
        if job.status.is_final:
            return _answer(job)
        if time.monotonic() >= deadline:
            content = JobRead.from_job(job).model_dump(mode="json")
            headers = {"Location": f"/v1/jobs/{job_id}"}
            return JSONResponse(content, status_code=202, headers=headers)
        if await request.is_disconnected():
            if cancel_on_disconnect:
                await run_in_threadpool(_cancel, url, job_id)
            return JSONResponse(error_body("cancelled", "the client went away"), status_code=499)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, POLL_MAX_S)


def _answer(job: Job) -> JSONResponse:
    if job.status is JobStatus.SUCCEEDED:
        return JSONResponse(response_object(job))
    if job.status is JobStatus.CANCELLED:
        body = error_body("cancelled", f"job {job.id} was cancelled", job_id=job.id)
        return JSONResponse(body, status_code=409)
    code = job.error_code or "internal_error"
    body = error_body(code, job.error_message or "generation failed", job_id=job.id)
    return JSONResponse(body, status_code=error_status(code))
