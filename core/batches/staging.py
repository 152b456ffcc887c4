"""A batch's jobs while it is validated: written and deleted in chunks, each chunk
its own short transaction, so a large ingest never holds the database.

The batch row is committed ``validating`` first; each chunk of job rows is then
committed with a renewal of the batch's ``ingest_heartbeat_at``, and the batch
becomes ``in_progress`` in one small commit at the end (or, for an invalid input,
its jobs are deleted a chunk at a time and it becomes ``failed``). The feeder sends
no job of a validating batch (:func:`core.feed.batches_to_feed`), the sweeper re-sends
only jobs once sent, and the finalizer and the counts look at open batches only,
so nothing half-created is ever running. On SQLite (one writer at a time) another
owner's submit waits for one chunk at most, not for the whole batch.

If the creating process dies mid-ingest, the heartbeat stops: the sweeper claims
the batch (sets the heartbeat NULL, which also refuses any later chunk or
acceptance by a creator that was only slow), deletes its jobs and fails it
(:func:`recover_stale`).

Rows are written by PostgreSQL's ``COPY`` (:class:`RowCopy`; the ingest streams
each chunk's rows as it makes them, core.batches.writer) and, on SQLite, by the
driver's executemany (SQLAlchemy's per-row parameter handling cost more than the
inserts).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pydantic_core
from sqlalchemy import Dialect, delete, or_, select, update
from sqlalchemy.orm import Session

from core.batches import lifecycle
from core.errors import ConflictError
from core.models import Batch, Job, utcnow
from core.status import BatchStatus, JobStatus

log = logging.getLogger(__name__)

CHUNK_ROWS = 1000
"""Job rows per transaction: on SQLite, the longest another writer waits on ingest."""

INTERRUPTED = {
    "code": "ingest_interrupted",
    "message": "the batch's ingest stopped before every line was validated (the process "
    "creating it ended); create the batch again",
    "param": None,
    "line": None,
}

# The columns a new job row sets (core.submit.job_row), in COPY's order.
COLUMNS = (
    "id",
    "status",
    "prompt",
    "messages",
    "model",
    "params",
    "seed",
    "owner",
    "priority",
    "callback_url",
    "custom_id",
    "batch_id",
    "submission_id",
    "attempts",
    "created_at",
    "enqueued_at",
)
_JSON_COLUMNS = frozenset({"messages", "params"})
_COPY = f"COPY job ({', '.join(COLUMNS)}) FROM STDIN"
_INSERT = f"INSERT INTO job ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


def _dumps(value: Any) -> str:
    """Compact JSON text (pydantic-core's encoder: ~4x json.dumps)."""
    return pydantic_core.to_json(value).decode()


class IngestAbandonedError(ConflictError):
    """The sweeper took over the batch (its ingest made no progress for
    ``GENQ_INGEST_STALE_S``) and fails it: create the batch again (HTTP 409)."""

    code = "ingest_abandoned"

    def __init__(self, batch_id: str) -> None:
        super().__init__(
            f"batch {batch_id}: the ingest stalled past GENQ_INGEST_STALE_S and was abandoned; "
            "create the batch again"
        )


def _mine(batch_id: str) -> Any:
    return (
        (Batch.id == batch_id)
        & (Batch.status == BatchStatus.VALIDATING.value)
        & Batch.ingest_heartbeat_at.is_not(None)
    )


def touch(session: Session, batch_id: str, *, written: int = 0) -> None:
    """Renew the batch's heartbeat in the caller's transaction (and, on PostgreSQL,
    hold the batch row until it ends, so that this commit and the sweeper's claim
    come one after the other: a claim first and this refuses the chunk, this first
    and the claim finds the batch alive); raise :class:`IngestAbandonedError`
    (rolled back) if the sweeper claimed it. A chunk of :func:`write_chunk` renews
    it first, a streamed one (core.batches.writer) last, just before its commit, so
    as not to hold the row while its lines are parsed.

    ``written``: the job rows the caller's transaction adds, counted in the batch's
    ``ingested`` with them, so the active-jobs quota sees the rows of a batch without
    an input file (``genq run``) while it is validated (core.quotas)."""
    result = session.execute(
        update(Batch)
        .where(_mine(batch_id))
        .values(ingest_heartbeat_at=utcnow(), ingested=Batch.ingested + written)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        raise IngestAbandonedError(batch_id)


def write_chunk(session: Session, batch_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Commit ``rows`` (of :func:`core.submit.job_row`) as the batch's next chunk."""
    touch(session, batch_id, written=len(rows))
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        with RowCopy(session) as copy:
            for row in rows:
                copy.write(row)
    else:
        # The driver's own bulk path, on the session's connection (its transaction):
        # SQLAlchemy's per-row parameter handling cost more than the insert itself.
        driver = session.connection().connection.driver_connection
        assert driver is not None
        processors = _bind_processors(dialect)
        cursor = driver.cursor()
        try:
            cursor.executemany(_INSERT, [_converted(row, processors) for row in rows])
        finally:
            cursor.close()
    session.commit()


class _ChunkDroppedError(Exception):
    """Given to an open ``COPY`` to end it without its rows (never raised)."""


class RowCopy:
    """A ``COPY`` of job rows into the session's transaction (PostgreSQL), each row
    sent to the server as the driver's buffer fills, so that the server takes the
    rows in while the caller makes the next ones. End it by :meth:`finish` (the rows
    are then in the transaction) or :meth:`cancel`, or use it as a context manager
    (finished, or cancelled on an exception); the connection runs nothing else
    meanwhile."""

    def __init__(self, session: Session) -> None:
        # The driver's COPY, on the session's connection (its transaction):
        # SQLAlchemy's per-row parameter handling cost more than the insert itself.
        driver = session.connection().connection.driver_connection
        assert driver is not None
        with contextlib.ExitStack() as stack:
            cursor = stack.enter_context(driver.cursor())
            self._copy = stack.enter_context(cursor.copy(_COPY))
            self._stack = stack.pop_all()  # open until finish() or cancel()

    def __enter__(self) -> RowCopy:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)

    def write(self, row: dict[str, Any]) -> None:
        """Add ``row`` (of :func:`core.submit.job_row`)."""
        self._copy.write_row(copy_values(row))

    def finish(self) -> None:
        """End the ``COPY``, raising the server's error if it refused a row."""
        self._stack.close()

    def cancel(self) -> None:
        """End the ``COPY`` without its rows (the transaction is then to roll back)."""
        error = _ChunkDroppedError("the chunk was dropped")
        self._stack.__exit__(_ChunkDroppedError, error, None)


Processors = tuple[tuple[int, Callable[[Any], Any]], ...]
"""(index in :data:`COLUMNS`, conversion) of the columns the driver needs converted."""


def _converted(row: dict[str, Any], processors: Processors) -> list[Any]:
    """The row's values in :data:`COLUMNS` order, as the driver takes them (a None
    JSON value is stored as JSON ``null``, as SQLAlchemy's JSON type stores it)."""
    values = [row[c] for c in COLUMNS]
    for index, convert in processors:
        values[index] = convert(values[index])
    return values


def copy_values(row: dict[str, Any]) -> list[Any]:
    """The values ``COPY`` takes for ``row`` (of :func:`core.submit.job_row`)."""
    return _converted(row, _COPY_PROCESSORS)


def _status(status: JobStatus) -> str:
    return status.value


# JSON as text and the status as its value; COPY (psycopg) adapts the other values
# itself, and elsewhere they are converted as SQLAlchemy converts them.
_OWN: dict[str, Callable[[Any], Any]] = dict.fromkeys(_JSON_COLUMNS, _dumps) | {"status": _status}
_COPY_PROCESSORS: Processors = tuple((i, _OWN[c]) for i, c in enumerate(COLUMNS) if c in _OWN)


@functools.cache
def _bind_processors(dialect: Dialect) -> Processors:
    columns = Job.__table__.c
    found = (
        (i, _OWN.get(c) or columns[c].type.bind_processor(dialect)) for i, c in enumerate(COLUMNS)
    )
    return tuple((i, p) for i, p in found if p is not None)


def _delete_chunk(session: Session, batch_id: str) -> int:
    ids = select(Job.id).where(Job.batch_id == batch_id).limit(CHUNK_ROWS)
    result = session.execute(
        delete(Job).where(Job.id.in_(ids)).execution_options(synchronize_session=False)
    )
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


def delete_jobs(session: Session, batch_id: str, *, by_sweeper: bool = False) -> None:
    """Delete the validating batch's jobs a chunk per transaction (the creator's
    chunks renew the heartbeat, and stop if the sweeper took over)."""
    while True:
        if not by_sweeper:
            touch(session, batch_id)
        deleted = _delete_chunk(session, batch_id)
        session.commit()
        if deleted < CHUNK_ROWS:
            return


def _stale(cutoff: dt.datetime) -> Any:
    heartbeat = Batch.ingest_heartbeat_at
    return (Batch.status == BatchStatus.VALIDATING.value) & or_(
        heartbeat.is_(None), heartbeat < cutoff
    )


def recover_stale(
    session_factory: Callable[[], Any], *, stale_after_s: float, limit: int = 100
) -> int:
    """Fail each validating batch whose ingest made no progress for ``stale_after_s``
    (or that an earlier recovery claimed and did not finish): claim it, delete its
    jobs a chunk at a time, then store it ``failed`` with ``ingest_interrupted``.
    Returns how many were failed. Safe to repeat after a crash at any step."""
    cutoff = utcnow() - dt.timedelta(seconds=stale_after_s)
    with session_factory() as session:
        ids = list(
            session.scalars(select(Batch.id).where(_stale(cutoff)).order_by(Batch.id).limit(limit))
        )
    done = 0
    for batch_id in ids:
        with session_factory() as session:
            claim = session.execute(
                update(Batch)
                .where(Batch.id == batch_id, _stale(cutoff))
                .values(ingest_heartbeat_at=None)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if not claim.rowcount:
                continue  # its ingest renewed the heartbeat just now: alive after all
            delete_jobs(session, batch_id, by_sweeper=True)
            if lifecycle.reject(session, batch_id, [INTERRUPTED], by_sweeper=True):
                done += 1
                log.warning("batch %s: its ingest stopped; failed and its jobs deleted", batch_id)
            session.commit()
    return done
