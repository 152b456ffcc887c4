"""Batch ingest: an input file (or ``genq run``'s requests) validated and turned into
one job row per request, streamed, a chunk of rows per transaction.

A batch is validated and ingested in one pass over its input, in bounded memory:
the batch row is committed ``validating``, each valid line becomes a job row, and
every :data:`core.batches.staging.CHUNK_ROWS` rows are committed together (so on
SQLite another owner's submit waits for a chunk, not for the batch; on PostgreSQL
a chunk's rows are streamed to the server while its lines are parsed,
:mod:`core.batches.writer`). Then the
batch becomes ``in_progress`` in one small commit; if any line was invalid, the
rows written are deleted (a chunk at a time) and the batch is stored ``failed``
with OpenAI's ``errors`` object naming each offending line. Nothing half-created
ever runs: the feeder (:mod:`core.feed`) sends no job of a validating batch, and
the sweeper fails a validating batch whose ingest died. Duplicate custom_ids are
found with :class:`core.batches.custom_ids.SeenIds` (~16 bytes a line), not a set
of the strings.
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

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import files, submit
from core.batches import lifecycle, staging, statistics, writer
from core.batches.custom_ids import SeenIds
from core.models import Batch, Job, utcnow
from core.openai_format import (
    COMPLETIONS_URL,
    ENDPOINTS,
    MAX_LINE_BYTES,
    OPENAI_DEFAULT_MAX_TOKENS,
    ParsedRequest,
    RequestError,
    error_list,
    parse_batch_line,
)
from core.settings import Settings
from core.status import BatchStatus

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 100
WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")


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


# genq's names of the generation parameters that :func:`core.submit.check_fits`
# judges, as a batch line's body spells them.
OPENAI_PARAM = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}


def check_fits(request: ParsedRequest, limits: Settings) -> None:
    """Raise :class:`core.submit.RequestTooLargeError`, naming the line's ``body``
    field, when the request could never run in a worker of ``limits`` (the check
    every other door makes at submit, rather than a failure at the worker)."""
    try:
        submit.check_fits(limits, [submit.NewJob.from_request(request)], prefix=lambda _: "")
    except submit.RequestTooLargeError as exc:
        param = OPENAI_PARAM.get(exc.param or "", exc.param)
        raise submit.RequestTooLargeError(exc.message, param=f"body.{param}") from exc


def parse_openai_file(
    lines: Iterable[tuple[int, bytes | None]],
    *,
    endpoint: str,
    models: Collection[str],
    without_template: Collection[str] = (),
    limits: Settings | None = None,
) -> Iterator[Parsed]:
    """Each non-blank line of a batch input file, parsed or its error (a line given
    as None was longer than :data:`core.openai_format.MAX_LINE_BYTES`; with
    ``limits``, a request too large for a worker, :func:`check_fits`)."""
    for number, raw in lines:
        if raw is None:
            yield (
                number,
                LineError(
                    number,
                    "line_too_large",
                    f"the line is longer than the limit of {MAX_LINE_BYTES} bytes",
                ),
            )
            continue
        if not raw or raw.isspace():
            continue
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            request = parse_batch_line(
                raw, endpoint=endpoint, models=models, without_template=without_template
            )
            if limits is not None:
                check_fits(request, limits)
        except (RequestError, submit.RequestTooLargeError) as exc:
            yield number, LineError(number, exc.code, exc.message, exc.param)
        else:
            yield number, request


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


def ingest(
    session: Session,
    batch: Batch,
    parsed: Iterable[Parsed],
    *,
    max_lines: int,
) -> IngestResult:
    """Insert one job per valid request of ``parsed`` for the validating ``batch``, a
    chunk per transaction, and report the invalid ones. Once a line is invalid no
    more rows are written (the rest is only validated); when the result has errors
    the caller deletes the rows written (:func:`core.batches.staging.delete_jobs`).

    Job ids come from one :func:`core.submit.id_sequence`, so ordering a batch's
    jobs by id is ordering them as the input was; the n-th distinct custom_id is
    the n-th job.
    """
    with writer.chunk_writer(session, batch.id) as out:
        return _ingest(session, batch, parsed, max_lines=max_lines, out=out)


def _ingest(
    session: Session,
    batch: Batch,
    parsed: Iterable[Parsed],
    *,
    max_lines: int,
    out: writer.ChunkWriter,
) -> IngestResult:
    result = IngestResult()
    batch_id, owner, priority = batch.id, batch.owner, batch.priority
    seen = SeenIds()
    now = utcnow()
    prefix = submit.sequence_prefix()

    def fail(error: LineError) -> None:
        """Report ``error``: the batch fails, so its open chunk is dropped at once (no
        transaction stays open while the rest is validated)."""
        result.add(error)
        out.abort()

    def same(position: int, custom_id: str) -> bool:
        """Whether the request at ``position`` has ``custom_id``. Unknown (its row was
        not kept, the batch failing already) counts as yes: the 64-bit hashes match."""
        if position >= out.committed:
            index = position - out.committed
            return index >= len(out.open_ids) or out.open_ids[index] == custom_id
        job_id = submit.sequence_id(prefix, position)
        return session.scalar(select(Job.custom_id).where(Job.id == job_id)) == custom_id

    for count, (number, item) in enumerate(parsed, start=1):
        if result.error_count and count % staging.CHUNK_ROWS == 0:
            # Only validating now: end the read transaction and show we are alive.
            staging.touch(session, batch_id)
            session.commit()
        if isinstance(item, LineError):
            fail(item)
            continue
        custom_id = item.custom_id or f"line-{number}"
        if item.custom_id is None:
            item = dataclasses.replace(item, custom_id=custom_id)
        if seen.add(custom_id, same) is not None:
            fail(
                LineError(
                    number,
                    "duplicate_custom_id",
                    f"custom_id {custom_id!r} is used by an earlier line",
                    "custom_id",
                )
            )
            continue
        result.total += 1
        if result.total > max_lines:
            fail(
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
        out.add(
            submit.job_row(
                submit.NewJob.from_request(item, priority=priority),
                job_id=submit.sequence_id(prefix, out.committed + len(out.open_ids)),
                owner=owner,
                default_max_new_tokens=OPENAI_DEFAULT_MAX_TOKENS,
                now=now,
                batch_id=batch_id,
            )
        )
    if not result.error_count:
        out.commit()
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
    limits: Settings | None = None,
) -> Batch:
    """Validate the input and create the batch with its jobs, committed.

    The input is the file ``input_file_id`` (OpenAI's batch format) or, for
    ``genq run``, ``parsed`` requests, streamed. Bulk work runs at ``low`` priority
    unless told otherwise, so interactive jobs go first. With ``limits``, a line too
    large for a worker is invalid (:func:`check_fits`). A batch with an invalid
    line ends ``failed`` with its ``errors`` and no jobs. ``before_commit`` runs in
    the transaction that creates the batch row (``validating``), e.g. to record an
    idempotency key, so a retry during a long ingest finds this batch. Returns
    once the batch is ``in_progress`` or ``failed``; send the jobs with
    :func:`core.feed.feed_once` after this returns (the workers' feeder goes on).
    If the ingest is interrupted (an exception), its rows are deleted and the
    batch failed before the exception goes on; if the process dies, the sweeper
    does that (:func:`core.batches.staging.recover_stale`).
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
            files.iter_bounded_lines(files.iter_chunks(session, file.id), MAX_LINE_BYTES),
            endpoint=endpoint,
            models=models,
            without_template=without_template,
            limits=limits,
        )
    now = utcnow()
    batch = Batch(
        id=new_batch_id(),
        owner=owner,
        status=BatchStatus.VALIDATING,
        endpoint=endpoint,
        completion_window=completion_window or "none",
        input_file_id=input_file_id,
        meta=metadata,
        run_key=run_key,
        callback_url=callback_url,
        priority=priority,
        created_at=now,
        expires_at=now + window if window else None,
        ingest_heartbeat_at=now,
    )
    session.add(batch)
    if before_commit is not None:
        before_commit(batch)
    session.commit()
    try:
        result = ingest(session, batch, parsed, max_lines=max_lines)
        if result.error_count:
            staging.delete_jobs(session, batch.id)
            errors = result.errors_object()["data"]
            lifecycle.reject(session, batch.id, errors, total=result.total, model=result.model)
        elif not lifecycle.accept(session, batch.id, total=result.total, model=result.model):
            raise staging.IngestAbandonedError(batch.id)
        session.commit()
    except staging.IngestAbandonedError:
        raise  # the sweeper has the batch: it deletes the rows and fails it
    except BaseException:
        session.rollback()
        _abandon(session, batch.id)
        raise
    if not result.error_count:  # accepted: many new rows may have outdated the statistics
        statistics.refresh_after_ingest(session, result.total)
    session.refresh(batch)
    return batch


def _abandon(session: Session, batch_id: str) -> None:
    """After an ingest interrupted by an exception: delete its rows and fail the
    batch, if the database lets us (else the sweeper does, once it is stale)."""
    try:
        staging.delete_jobs(session, batch_id)
        lifecycle.reject(session, batch_id, [staging.INTERRUPTED])
        session.commit()
    except Exception:
        session.rollback()
        log.warning("batch %s: ingest interrupted; the sweeper will fail it", batch_id)
