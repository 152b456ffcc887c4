"""Batch results: request counts and usage, and the output and error files, made
from the batch's job rows when read (virtual files, see :mod:`core.files`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core import files, tally
from core.models import Batch, BatchTally, File, Job, utcnow
from core.openai_format import dump_line, result_line
from core.status import BATCH_FINAL, BatchStatus, JobStatus

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


@dataclasses.dataclass
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    active: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def counts(session: Session, batch_id: str) -> Counts:
    """The batch's request counts and token usage, kept as its jobs finish
    (:mod:`core.tally`): two short reads, whatever the batch's size."""
    total = session.scalar(select(Batch.total).where(Batch.id == batch_id)) or 0
    done = tally.read(session, batch_id)
    return Counts(
        total=total,
        completed=done.completed,
        failed=done.failed,
        active=max(total - done.completed - done.failed, 0),
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
    )


def cancel_code(status: BatchStatus) -> str:
    """The error code of a batch's cancelled requests in its error file."""
    return {BatchStatus.EXPIRED: "batch_expired", BatchStatus.CANCELLED: "batch_cancelled"}.get(
        status, "cancelled"
    )


def result_lines(
    session: Session, batch: Batch, *, kind: str | None, status: BatchStatus | None = None
) -> Iterator[tuple[str, bytes]]:
    """(``output`` or ``error``, line) for the batch's jobs in input order, streamed
    from a server-side cursor. ``kind`` selects one file, None gives every job;
    ``status``: the batch's final status when it is being finalized."""
    query = select(*RESULT_COLUMNS).where(Job.batch_id == batch.id)
    if kind == "output":
        query = query.where(Job.status == JobStatus.SUCCEEDED)
    elif kind == "error":
        query = query.where(Job.status != JobStatus.SUCCEEDED)
    code = cancel_code(status or batch.status)
    for row in session.execute(query.order_by(Job.id).execution_options(yield_per=500)):
        line_kind = "output" if row.status == JobStatus.SUCCEEDED else "error"
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


def purge(session: Session, *, older_than_days: float) -> tuple[int, int]:
    """Delete what the retention age has passed: finished batches no job refers to
    any more (their jobs are purged first), and files made before the cutoff that no
    unfinished batch reads. Returns (batches, files) deleted."""
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    has_jobs = select(Job.id).where(Job.batch_id == Batch.id).exists()
    gone_batches = session.execute(
        delete(Batch).where(Batch.status.in_(BATCH_FINAL), Batch.created_at < cutoff, ~has_jobs)
    )
    in_use = select(Batch.input_file_id).where(
        Batch.status.not_in(BATCH_FINAL), Batch.input_file_id.is_not(None)
    )
    results_alive = select(Batch.id).where(Batch.id == File.batch_id).exists()
    gone_files = session.execute(
        delete(File).where(
            File.created_at < cutoff,
            File.id.not_in(in_use),
            (File.virtual.is_(None)) | ~results_alive,
        )
    )
    session.execute(delete(BatchTally).where(BatchTally.batch_id.not_in(select(Batch.id))))
    return int(gone_batches.rowcount), int(gone_files.rowcount)  # type: ignore[attr-defined]
