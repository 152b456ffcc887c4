"""/v1/files: OpenAI's Files API (upload, list, retrieve, content, delete)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import IdempotencyKeyHeader, OwnerDep, SessionDep, SettingsDep
from api.errors import APIError
from core import batches, files, idempotency, quotas
from core.db import get_sessionmaker
from core.models import LOCAL_OWNER, File
from core.openai_format import list_object

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("")
def upload_file(
    file: UploadFile,
    purpose: Annotated[str, Form(description="'batch'")],
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> dict[str, Any]:
    """Upload a JSONL file of requests (multipart; purpose=batch). With an
    ``Idempotency-Key``, a retry of the same upload returns the same file."""
    if purpose not in files.PURPOSES:
        raise APIError(
            400, "invalid_request", f"purpose must be one of {', '.join(files.PURPOSES)}", "purpose"
        )
    tenant = owner or LOCAL_OWNER
    quotas.check_file_bytes(session, tenant, 1, settings.quota_file_bytes)  # already full?
    try:
        upload = files.store_upload(
            session,
            file.file,
            owner=owner or LOCAL_OWNER,
            filename=file.filename or "upload.jsonl",
            purpose=purpose,
            max_bytes=settings.max_file_bytes,
            max_lines=settings.max_batch_lines,
        )
    except (files.FileTooLargeError, files.TooManyLinesError):
        session.rollback()  # api/errors.py answers 413 / 400
        raise
    try:  # the owner's files, this one included (flushed, not committed), counted
        # under the owner's lock, so a concurrent upload is counted once it commits
        quotas.check_file_bytes(session, tenant, 0, settings.quota_file_bytes, lock=True)
    except quotas.QuotaExceededError:
        session.rollback()
        raise
    row = upload.file
    replay = idempotency.IdempotentRequest.begin(
        session,
        owner=owner or LOCAL_OWNER,
        key=idempotency_key,
        endpoint="files",
        body={"purpose": purpose, "filename": row.filename, "sha256": upload.sha256},
    )
    if replay is not None:
        if (earlier := replay.earlier()) is not None:
            if files.exists(session, earlier):
                session.rollback()  # drop this copy of the upload
                return files.file_object(files.get_file(session, earlier, owner=owner))
            replay.forget()  # that file was deleted since: this upload takes its place
        replay.remember(row.id)
    session.commit()
    return files.file_object(row)


@router.get("")
def list_files(
    session: SessionDep,
    owner: OwnerDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Files, newest first by default; pass the last id as ``after`` for the next page."""
    rows, has_more = files.list_files(
        session, owner=owner, purpose=purpose, limit=limit, after=after, order=order
    )
    data = [files.file_object(f) for f in rows]
    return list_object(data, has_more=has_more)


@router.get("/{file_id}")
def retrieve_file(file_id: str, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    """One file's metadata."""
    return files.file_object(files.get_file(session, file_id, owner=owner))


@router.delete("/{file_id}")
def delete_file(file_id: str, session: SessionDep, owner: OwnerDep) -> dict[str, Any]:
    """Delete a file. A batch made from it keeps its jobs and results."""
    files.delete_file(session, file_id, owner=owner)
    session.commit()
    return {"id": file_id, "object": "file", "deleted": True}


def _stream(database_url: str, file_id: str) -> Iterator[bytes]:
    # Its own session: the response is streamed after the request's session closed.
    with get_sessionmaker(database_url)() as session:
        file = session.get(File, file_id)
        if file is not None:
            yield from batches.file_content(session, file)


def content_disposition(filename: str) -> str:
    """``attachment`` with the name per RFC 6266: an ASCII fallback in ``filename``
    and the exact name, UTF-8 and percent-encoded, in ``filename*``."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get("/{file_id}/content")
def file_content(
    file_id: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep
) -> StreamingResponse:
    """The file's content, streamed (a batch's output is made from its job rows)."""
    file = files.get_file(session, file_id, owner=owner)
    headers = {"Content-Disposition": content_disposition(file.filename)}
    if file.virtual is None:
        headers["Content-Length"] = str(file.bytes)
    return StreamingResponse(
        _stream(settings.resolved_database_url, file.id),
        media_type="application/octet-stream",
        headers=headers,
    )
