"""Batches: one job row per request, created in one transaction, and their results.

A batch is validated and ingested in one pass over its input: each valid line
becomes a job row, bulk-inserted a thousand at a time; if any line is invalid the
transaction is rolled back and the batch is stored ``failed`` with OpenAI's
``errors`` object naming each offending line. Nothing is half-created, and the
job ids are sent to the broker only after the commit (a lost send is re-sent by
the sweeper, like any queued job).

Status: ``in_progress`` once ingested (validation is synchronous, so
``validating`` is never stored) → ``finalizing`` → ``completed``; or ``failed``
(validation), ``cancelling`` → ``cancelled``, ``expired``. The finalizer (each
sweep, and on read) completes a batch whose jobs are all final, in one
transaction: it records the counts and the output and error files, which are
"virtual" files made from the job rows when read (see :mod:`core.files`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from core import files, webhooks
from core.jobs import new_job_id
from core.models import Batch, File, Job, utcnow
from core.openai_format import (
    COMPLETIONS_URL,
    ENDPOINTS,
    ParsedRequest,
    RequestError,
    dump_line,
    error_list,
    parse_batch_line,
    result_line,
    unix,
)
from core.queue import JobQueue, Route
from core.status import JobStatus

log = logging.getLogger(__name__)

INSERT_CHUNK = 1000
MAX_REPORTED_ERRORS = 100
ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "cancelled", "expired")
WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")
RESULT_COLUMNS = (
    Job.id,
    Job.custom_id,
    Job.status,
    Job.model,
    Job.outputs,
    Job.finish_reasons,
    Job.logprobs,
    Job.messages,
    Job.prompt_tokens,
    Job.completion_tokens,
    Job.error_code,
    Job.error_message,
    Job.created_at,
    Job.finished_at,
)


class NoSuchBatchError(LookupError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id!r}")
        self.batch_id = batch_id


class BatchConflictError(Exception):
    """The batch is in a status that does not allow the operation."""


@dataclasses.dataclass(frozen=True)
class LineError:
    """An invalid line of an input file."""

    line: int | None
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


Parsed = tuple[int, ParsedRequest | LineError]


def new_batch_id() -> str:
    return f"batch_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def parse_window(window: str | None) -> dt.timedelta | None:
    """``"24h"`` → 24 hours; None: no expiry (``genq run``)."""
    if window is None:
        return None
    match = WINDOW.match(window)
    if not match:
        raise RequestError(
            "invalid_request", "completion_window must be hours, like '24h'", "completion_window"
        )
    return dt.timedelta(hours=int(match.group(1)))


def parse_openai_file(
    lines: Iterable[tuple[int, bytes]],
    *,
    endpoint: str,
    models: Collection[str],
    without_template: Collection[str] = (),
) -> Iterator[Parsed]:
    """Each non-blank line of a batch input file, parsed or its error."""
    for number, raw in lines:
        if not raw.strip():
            continue
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield (
                number,
                parse_batch_line(
                    raw, endpoint=endpoint, models=models, without_template=without_template
                ),
            )
        except RequestError as exc:
            yield number, LineError(number, exc.code, exc.message, exc.param)


@dataclasses.dataclass
class IngestResult:
    total: int = 0
    model: str | None = None
    errors: list[LineError] = dataclasses.field(default_factory=list)
    error_count: int = 0

    def add(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)

    def errors_object(self) -> dict[str, Any]:
        data = [e.as_dict() for e in self.errors]
        if self.error_count > len(self.errors):
            more = self.error_count - len(self.errors)
            data.append(
                LineError(None, "too_many_errors", f"and {more} more invalid lines").as_dict()
            )
        return error_list(data)


def job_row(
    request: ParsedRequest,
    *,
    job_id: str,
    batch_id: str | None,
    owner: str,
    now: dt.datetime,
    priority: str = "normal",
) -> dict[str, Any]:
    """The values of a new queued job row for ``request`` (for a bulk insert)."""
    params = request.params
    seed = params.seed if params.seed is not None else secrets.randbits(32)
    return {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "prompt": request.prompt,
        "messages": request.messages,
        "model": request.model,
        "params": params.model_dump(mode="json", exclude_none=True),
        "seed": seed,
        "owner": owner,
        "priority": priority,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": now,
        "batch_id": batch_id,
        "custom_id": request.custom_id,
    }


def ingest(
    session: Session,
    batch: Batch,
    parsed: Iterable[Parsed],
    *,
    max_lines: int,
) -> IngestResult:
    """Insert one job per valid request of ``parsed`` for ``batch``, and report the
    invalid ones. When the result has errors the caller must roll back.

    Job ids share the batch's millisecond and carry the request's ordinal, so
    ordering a batch's jobs by id is ordering them as the input was.
    """
    result = IngestResult()
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    now = utcnow()
    prefix = f"job_{time.time_ns() // 1_000_000:012x}"
    for number, item in parsed:
        if isinstance(item, LineError):
            result.add(item)
            continue
        custom_id = item.custom_id or f"line-{number}"
        if item.custom_id is None:
            item = dataclasses.replace(item, custom_id=custom_id)
        if custom_id in seen:
            result.add(
                LineError(
                    number,
                    "duplicate_custom_id",
                    f"custom_id {custom_id!r} is used by an earlier line",
                    "custom_id",
                )
            )
            continue
        seen.add(custom_id)
        result.total += 1
        if result.total > max_lines:
            result.add(
                LineError(
                    number,
                    "too_many_lines",
                    f"the file has more than {max_lines} requests, the limit per batch "
                    "(GENQ_MAX_BATCH_LINES)",
                )
            )
            break
        result.model = result.model or item.model
        if result.error_count:
            continue  # the batch fails: validate the rest, insert nothing more
        job_id = f"{prefix}{result.total:08x}{secrets.token_hex(6)}"
        rows.append(
            job_row(
                item,
                job_id=job_id,
                batch_id=batch.id,
                owner=batch.owner,
                now=now,
                priority=batch.priority,
            )
        )
        if len(rows) >= INSERT_CHUNK:
            session.execute(insert(Job), rows)
            rows.clear()
    if rows and not result.error_count:
        session.execute(insert(Job), rows)
    if result.total == 0 and not result.error_count:
        result.add(LineError(None, "empty_file", "the file holds no requests"))
    return result


def create_batch(
    session: Session,
    *,
    owner: str,
    input_file_id: str | None,
    parsed: Iterable[Parsed] | None = None,
    endpoint: str = COMPLETIONS_URL,
    completion_window: str | None = "24h",
    metadata: dict[str, Any] | None = None,
    models: Collection[str],
    max_lines: int,
    without_template: Collection[str] = (),
    run_key: str | None = None,
    callback_url: str | None = None,
    priority: str = "low",
    before_commit: Callable[[Batch], None] | None = None,
) -> Batch:
    """Validate the input and create the batch with its jobs, committed.

    The input is the file ``input_file_id`` (OpenAI's batch format) or, for
    ``genq run``, ``parsed`` requests. Bulk work runs at ``low`` priority unless
    told otherwise, so interactive jobs go first. A batch with an invalid line is committed
    ``failed`` with its ``errors`` and no jobs. Send the jobs with
    :func:`enqueue_batch` after this returns.
    """
    if endpoint not in ENDPOINTS:
        raise RequestError(
            "invalid_request",
            f"endpoint {endpoint!r} is not supported; genq serves {', '.join(ENDPOINTS)}",
            "endpoint",
        )
    window = parse_window(completion_window)
    if parsed is None:
        if input_file_id is None:
            raise RequestError("missing_required_parameter", "input_file_id is required")
        file = files.get_file(session, input_file_id, owner=owner)
        if file.purpose != "batch":
            raise RequestError(
                "invalid_request",
                f"file {file.id} has purpose {file.purpose!r}, not 'batch'",
                "input_file_id",
            )
        parsed = parse_openai_file(
            files.iter_lines(files.iter_chunks(session, file.id)),
            endpoint=endpoint,
            models=models,
            without_template=without_template,
        )
    now = utcnow()

    def new_batch(status: str) -> Batch:
        return Batch(
            id=batch_id,
            owner=owner,
            status=status,
            endpoint=endpoint,
            completion_window=completion_window or "none",
            input_file_id=input_file_id,
            meta=metadata,
            run_key=run_key,
            callback_url=callback_url,
            priority=priority,
            created_at=now,
            expires_at=now + window if window else None,
        )

    batch_id = new_batch_id()
    batch = new_batch("in_progress")
    batch.in_progress_at = now
    session.add(batch)
    session.flush()
    result = ingest(session, batch, parsed, max_lines=max_lines)
    if result.error_count:
        session.rollback()
        batch = new_batch("failed")
        batch.failed_at = utcnow()
        batch.errors = result.errors_object()["data"]
        session.add(batch)
        session.flush()
        webhooks.record_batch_event(session, batch)
    batch.total = result.total
    batch.model = result.model
    if before_commit is not None:
        before_commit(batch)  # e.g. record an idempotency key in this transaction
    session.commit()
    return batch


def submit_request(session: Session, queue: JobQueue, request: ParsedRequest, *, owner: str) -> str:
    """Commit one job for ``request`` (no batch), then send it; returns its id."""
    job_id = new_job_id()
    session.execute(
        insert(Job), [job_row(request, job_id=job_id, batch_id=None, owner=owner, now=utcnow())]
    )
    session.commit()
    try:
        queue.enqueue(job_id, model=request.model)
    except Exception:
        log.warning("could not enqueue job %s; it stays queued for the sweeper", job_id)
    return job_id


def queued_ids(session: Session, batch_id: str) -> Iterator[str]:
    """The batch's queued job ids in input order, streamed."""
    query = (
        select(Job.id)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED.value)
        .order_by(Job.id)
        .execution_options(yield_per=1000)
    )
    yield from session.scalars(query)


def enqueue_batch(session: Session, queue: JobQueue, batch_id: str) -> int:
    """Send the batch's queued jobs to their model's queue; returns how many were sent.

    A duplicate message is harmless (a claim is conditional), so this also serves
    to re-send after an interruption.
    """
    query = (
        select(Job.id, Job.model, Job.priority)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED.value)
        .order_by(Job.id)
    )
    routes = [Route(*row) for row in session.execute(query)]
    session.rollback()  # end the read transaction before the (slow) sends
    queue.enqueue_many(routes)
    return len(routes)


def get_batch(session: Session, batch_id: str, *, owner: str | None) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or (owner is not None and batch.owner != owner):
        raise NoSuchBatchError(batch_id)
    return batch


def list_batches(
    session: Session, *, owner: str | None, limit: int, after: str | None
) -> tuple[list[Batch], bool]:
    """Batches newest first; ``after`` is the last id of the previous page."""
    query = select(Batch).order_by(Batch.id.desc()).limit(limit + 1)
    if owner is not None:
        query = query.where(Batch.owner == owner)
    if after is not None:
        query = query.where(Batch.id < after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


@dataclasses.dataclass
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    active: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def counts(session: Session, batch_id: str) -> Counts:
    """The batch's request counts and token usage, from its job rows."""
    query = (
        select(
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
        )
        .where(Job.batch_id == batch_id)
        .group_by(Job.status)
    )
    result = Counts()
    for status, count, prompt_tokens, completion_tokens in session.execute(query):
        result.total += count
        if status == JobStatus.SUCCEEDED.value:
            result.completed += count
            result.prompt_tokens += int(prompt_tokens or 0)
            result.completion_tokens += int(completion_tokens or 0)
        elif status in ACTIVE:
            result.active += count
        else:
            result.failed += count
    return result


def cancel_code(batch: Batch) -> str:
    """The error code of a batch's cancelled requests in its error file."""
    return {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(
        batch.status, "cancelled"
    )


def result_lines(
    session: Session, batch: Batch, *, kind: str | None
) -> Iterator[tuple[str, bytes]]:
    """(``output`` or ``error``, line) for the batch's jobs in input order, streamed
    from a server-side cursor. ``kind`` selects one file, None gives every job."""
    query = select(*RESULT_COLUMNS).where(Job.batch_id == batch.id)
    if kind == "output":
        query = query.where(Job.status == JobStatus.SUCCEEDED.value)
    elif kind == "error":
        query = query.where(Job.status != JobStatus.SUCCEEDED.value)
    code = cancel_code(batch)
    for row in session.execute(query.order_by(Job.id).execution_options(yield_per=500)):
        line_kind = "output" if row.status == JobStatus.SUCCEEDED.value else "error"
        yield line_kind, dump_line(result_line(row, cancel_code=code))


def file_content(session: Session, file: File) -> Iterator[bytes]:
    """A file's content, streamed: stored chunks, or a batch's results from its jobs."""
    if file.virtual is None:
        yield from files.iter_chunks(session, file.id)
        return
    batch = session.get(Batch, file.batch_id) if file.batch_id else None
    if batch is None:
        return
    buffer = bytearray()
    for _, line in result_lines(session, batch, kind=file.virtual):
        buffer += line
        if len(buffer) >= 64 * 1024:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


# --- cancel, expire, finalize ---------------------------------------------------------


def _stop_jobs(session: Session, batch_id: str) -> int:
    """Cancel the batch's queued and running jobs (a running one stops within a few
    steps: its worker's monitor aborts it); finished ones are kept."""
    result = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status.in_(ACTIVE))
        .values(status=JobStatus.CANCELLED.value, finished_at=utcnow(), lease_expires_at=None)
    )
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


def cancel_batch(session: Session, batch_id: str, *, owner: str | None) -> Batch:
    """Cancel a batch: ``cancelling`` now, ``cancelled`` once finalized (not committed)."""
    batch = get_batch(session, batch_id, owner=owner)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    if batch.status in FINAL:
        raise BatchConflictError(f"batch {batch_id} already {batch.status}; it cannot be cancelled")
    _stop_jobs(session, batch.id)
    batch.status = "cancelling"
    batch.cancelling_at = utcnow()
    session.flush()
    return batch


def finalize(session: Session, batch: Batch) -> bool:
    """Complete (or cancel, or expire) the batch if all its jobs are final; True if
    it did. Runs in the caller's transaction: commit after."""
    if batch.status not in ("in_progress", "cancelling", "finalizing"):
        return False
    now = utcnow()
    expiring = (
        batch.status == "in_progress" and batch.expires_at is not None and batch.expires_at < now
    )
    if expiring:
        _stop_jobs(session, batch.id)
    elif counts(session, batch.id).active:
        return False
    final = {"in_progress": "completed", "finalizing": "completed", "cancelling": "cancelled"}[
        batch.status
    ]
    if expiring:
        final = "expired"
    # Claim the batch: of two finalizers (sweeper and a reader) only one goes on.
    claimed = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == batch.status)
        .values(status="finalizing", finalizing_at=now)
    )
    if not claimed.rowcount:  # type: ignore[attr-defined]
        session.refresh(batch)
        return False
    session.refresh(batch)
    batch.status = final  # the error codes of cancelled requests depend on it
    sizes = {"output": [0, 0], "error": [0, 0]}  # bytes, lines
    for kind, line in result_lines(session, batch, kind=None):
        sizes[kind][0] += len(line)
        sizes[kind][1] += 1
    for kind, (size, lines) in sizes.items():
        if not lines:
            continue
        file = File(
            id=files.new_file_id(),
            owner=batch.owner,
            purpose=files.OUTPUT_PURPOSE,
            filename=f"{batch.id}_{kind}.jsonl",
            bytes=size,
            lines=lines,
            virtual=kind,
            batch_id=batch.id,
            created_at=now,
        )
        session.add(file)
        if kind == "output":
            batch.output_file_id = file.id
        else:
            batch.error_file_id = file.id
    stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}
    setattr(batch, stamp[final], utcnow())
    session.flush()
    webhooks.record_batch_event(session, batch)
    return True


def finalize_due(session_factory: Callable[[], Any], *, limit: int = 100) -> int:
    """Finalize the open batches that can be (the sweeper calls this); each in its
    own transaction. Returns how many were finalized."""
    with session_factory() as session:
        ids = list(
            session.scalars(
                select(Batch.id)
                .where(Batch.status.in_(("in_progress", "cancelling", "finalizing")))
                .order_by(Batch.id)
                .limit(limit)
            )
        )
    done = 0
    for batch_id in ids:
        with session_factory() as session:
            batch = session.get(Batch, batch_id)
            if batch is not None and finalize(session, batch):
                session.commit()
                done += 1
    return done


def batch_object(session: Session, batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object, with the request counts and usage from the job rows."""
    tally = counts(session, batch.id)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": error_list(batch.errors) if batch.errors else None,
        "input_file_id": batch.input_file_id or "",
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at),
        "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at),
        "failed_at": unix(batch.failed_at),
        "expired_at": unix(batch.expired_at),
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": tally.completed,
            "failed": tally.failed,
        },
        "usage": {
            "input_tokens": tally.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tally.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tally.prompt_tokens + tally.completion_tokens,
        },
        "metadata": batch.meta,
    }


def purge(session: Session, *, older_than_days: float) -> tuple[int, int]:
    """Delete what the retention age has passed: finished batches no job refers to
    any more (their jobs are purged first), and files made before the cutoff that no
    unfinished batch reads. Returns (batches, files) deleted."""
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    has_jobs = select(Job.id).where(Job.batch_id == Batch.id).exists()
    gone_batches = session.execute(
        delete(Batch).where(Batch.status.in_(FINAL), Batch.created_at < cutoff, ~has_jobs)
    )
    in_use = select(Batch.input_file_id).where(
        Batch.status.not_in(FINAL), Batch.input_file_id.is_not(None)
    )
    results_alive = select(Batch.id).where(Batch.id == File.batch_id).exists()
    gone_files = session.execute(
        delete(File).where(
            File.created_at < cutoff,
            File.id.not_in(in_use),
            (File.virtual.is_(None)) | ~results_alive,
        )
    )
    return int(gone_batches.rowcount), int(gone_files.rowcount)  # type: ignore[attr-defined]
