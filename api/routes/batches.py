"""/v1/batches: OpenAI's Batch API (create, retrieve, list, cancel)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import IdempotencyKeyHeader, OwnerDep, QueueDep, SessionDep, SettingsDep
from api.errors import APIError
from core import batches, egress, feed, files, idempotency, quotas
from core.db import get_sessionmaker
from core.models import LOCAL_OWNER
from core.openai_format import COMPLETIONS_URL, list_object
from core.queue import JobQueue
from core.schemas import CallbackUrl
from core.settings import Settings
from core.submit import models_without_chat_template, served_models

router = APIRouter(prefix="/v1/batches", tags=["batches"])
log = logging.getLogger(__name__)


class BatchCreate(BaseModel):
    """Body of ``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = COMPLETIONS_URL
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: dict[str, Any] | None = None  # accepted; results follow job retention
    # A genq extension: POSTed the batch, signed, when it ends (docs/webhooks.md).
    callback_url: CallbackUrl | None = None


def _feed(settings: Settings, queue: JobQueue, batch_id: str) -> None:
    """Send the first window of the batch at once; the workers' feeder sends the rest."""
    try:
        sent = feed.feed_once(get_sessionmaker(settings.resolved_database_url), queue, settings)
        log.info("batch %s: first %d jobs sent", batch_id, sum(sent.values()))
    except Exception:  # the jobs are committed: the workers' feeder sends them
        log.warning("batch %s: jobs not sent yet; the feeder will", batch_id, exc_info=True)


@router.post("")
def create_batch(
    body: BatchCreate,
    background: BackgroundTasks,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> dict[str, Any]:
    """Validate the input file and queue one job per line; a file with an invalid line
    gives a ``failed`` batch whose ``errors`` name each offending line. With an
    ``Idempotency-Key``, a retry with the same body returns the same batch."""
    callback_url = str(body.callback_url) if body.callback_url else None
    egress.check_callbacks([("callback_url", callback_url)], settings.webhook_allow)
    replay = idempotency.IdempotentRequest.begin(
        session,
        owner=owner or LOCAL_OWNER,
        key=idempotency_key,
        endpoint="batches",
        body=body.model_dump(mode="json"),
    )
    if replay is not None and (earlier := replay.earlier()) is not None:
        return batches.batch_object(session, batches.get_batch(session, earlier, owner=owner))
    try:
        lines = files.get_file(session, body.input_file_id, owner=owner).lines
    except files.NoSuchFileError as exc:
        raise APIError(404, "not_found", str(exc), "input_file_id") from exc
    quotas.check_active_jobs(session, owner or LOCAL_OWNER, lines, settings.quota_active_jobs)
    try:
        batch = batches.create_batch(
            session,
            owner=owner or LOCAL_OWNER,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            models=served_models(session, settings),
            without_template=models_without_chat_template(session, settings),
            max_lines=settings.max_batch_lines,
            limits=settings,
            callback_url=callback_url,
            before_commit=(lambda batch: replay.remember(batch.id)) if replay else None,
        )
    except files.NoSuchFileError as exc:
        raise APIError(404, "not_found", str(exc), "input_file_id") from exc
    if batch.status == "in_progress":
        # After the response: the rows are committed.
        background.add_task(_feed, settings, queue, batch.id)
    return batches.batch_object(session, batch)


@router.get("")
def list_batches(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Batches newest first; pass the last id as ``after`` for the next page."""
    rows, has_more = batches.list_batches(session, owner=owner, limit=limit, after=after)
    data = [batches.batch_object(session, b) for b in rows]
    return list_object(data, has_more=has_more)


@router.get("/{batch_id}")
def retrieve_batch(batch_id: str, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    """One batch, with its request counts (kept as its jobs finish: no scan of
    them). Finalizing happens in the background (the workers' feeder), never here."""
    batch = batches.get_batch(session, batch_id, owner=owner)
    return batches.batch_object(session, batch)


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    """Cancel queued requests and stop running ones; finished ones are kept."""
    batch = batches.cancel_batch(session, batch_id, owner=owner)
    session.commit()
    return batches.batch_object(session, batch)
