"""The batch state machine: every change of a batch's status, each one conditional UPDATE.

``validating`` while its jobs are inserted in chunks (core.batches.staging), then
``in_progress`` (:func:`accept`) or, for an invalid input or an ingest that died,
``failed`` with its errors and no jobs (:func:`reject`) → ``finalizing`` →
``completed``; or ``cancelling`` → ``finalizing`` → ``cancelled``; or, past its
window, ``finalizing`` → ``expired``. The finalizer (the workers' feeder and
sweeper, never a client's request) first folds the batch's tally rows into its
counters (:mod:`core.tally`), then completes a batch whose jobs are all final,
in one transaction: it claims the
batch by moving it to ``finalizing`` (of two finalizers only one wins), records
the output and error files, then moves it to its final status and writes its
webhook outbox row. A batch's jobs are cancelled through :mod:`core.jobstate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from core import files, jobstate, tally, webhooks
from core.batches.results import counts, result_lines
from core.errors import ConflictError, NotFoundError
from core.models import Batch, BatchTally, File, Job, utcnow
from core.status import BATCH_OPEN, BATCH_TRANSITIONS, BatchStatus, sources

VALIDATING, FAILED = BatchStatus.VALIDATING, BatchStatus.FAILED
IN_PROGRESS, CANCELLING = BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING
FINALIZING, COMPLETED = BatchStatus.FINALIZING, BatchStatus.COMPLETED
CANCELLED, EXPIRED = BatchStatus.CANCELLED, BatchStatus.EXPIRED

_ACCEPT_FROM = sources(BATCH_TRANSITIONS, IN_PROGRESS, VALIDATING)
_REJECT_FROM = sources(BATCH_TRANSITIONS, FAILED, VALIDATING)
_CANCEL_FROM = sources(BATCH_TRANSITIONS, CANCELLING, IN_PROGRESS)
_FINALIZE_FROM = sources(BATCH_TRANSITIONS, FINALIZING, IN_PROGRESS, CANCELLING, FINALIZING)
# The final status each open status finalizes into (past its window: expired).
_FINAL_OF = {IN_PROGRESS: COMPLETED, FINALIZING: COMPLETED, CANCELLING: CANCELLED}
_STAMP = {COMPLETED: "completed_at", CANCELLED: "cancelled_at", EXPIRED: "expired_at"}
for _final in _STAMP:
    sources(BATCH_TRANSITIONS, _final, FINALIZING)


class NoSuchBatchError(NotFoundError):
    """No batch with that id (or not visible to the caller)."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id!r}", param="batch_id")
        self.batch_id = batch_id


class BatchConflictError(ConflictError):
    """The batch is in a status that does not allow the operation."""


def get_batch(session: Session, batch_id: str, *, owner: str | None) -> Batch:
    """The batch, if it exists and ``owner`` (None: anyone) may see it."""
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


def _move(
    session: Session,
    batch_id: str,
    to: BatchStatus,
    from_: tuple[BatchStatus, ...],
    *where: ColumnElement[bool],
    **values: Any,
) -> bool:
    """The one statement that changes a batch's status; whether it happened."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(from_), *where)
        .values(status=to, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _ingest_owned(by_sweeper: bool) -> ColumnElement[bool]:
    """The batch's ingest is still its creator's (heartbeat set) or the sweeper's
    (NULL: it claimed a batch whose creator died): the loser's move does nothing."""
    column = Batch.ingest_heartbeat_at
    return column.is_(None) if by_sweeper else column.is_not(None)


def accept(session: Session, batch_id: str, *, total: int, model: str | None) -> bool:
    """``validating`` → ``in_progress`` once every job is inserted: the feeder may send
    them from the commit on. False if the sweeper claimed the batch first. In the
    caller's transaction: commit after."""
    return _move(
        session,
        batch_id,
        IN_PROGRESS,
        _ACCEPT_FROM,
        _ingest_owned(False),
        in_progress_at=utcnow(),
        total=total,
        model=model,
    )


def reject(
    session: Session,
    batch_id: str,
    errors: list[dict[str, Any]],
    *,
    total: int = 0,
    model: str | None = None,
    by_sweeper: bool = False,
) -> bool:
    """``validating`` → ``failed`` with OpenAI's ``errors`` (its jobs already deleted),
    and its webhook outbox row. In the caller's transaction: commit after."""
    moved = _move(
        session,
        batch_id,
        FAILED,
        _REJECT_FROM,
        _ingest_owned(by_sweeper),
        failed_at=utcnow(),
        errors=errors,
        total=total,
        model=model,
    )
    if moved:
        batch = session.get_one(Batch, batch_id)
        session.refresh(batch)
        webhooks.record_batch_event(session, batch)
    return moved


def cancel_batch(session: Session, batch_id: str, *, owner: str | None) -> Batch:
    """Cancel a batch: ``cancelling`` now (its queued and running jobs cancelled),
    ``cancelled`` once finalized. In the caller's transaction: commit after."""
    batch = get_batch(session, batch_id, owner=owner)
    if _move(session, batch.id, CANCELLING, _CANCEL_FROM, cancelling_at=utcnow()):
        jobstate.cancel_where(session, Job.batch_id == batch.id)
    session.refresh(batch)
    if batch.status not in (CANCELLING, CANCELLED):
        raise BatchConflictError(f"batch {batch_id} already {batch.status}; it cannot be cancelled")
    return batch


def finalize(session: Session, batch: Batch) -> bool:
    """Complete (or cancel, or expire) the batch if all its jobs are final; True if
    it did. Runs in the caller's transaction: commit after."""
    if batch.status not in _FINALIZE_FROM:
        return False
    now = utcnow()
    expiring = (
        batch.status is IN_PROGRESS and batch.expires_at is not None and batch.expires_at < now
    )
    if not expiring and counts(session, batch.id).active:
        return False
    final = EXPIRED if expiring else _FINAL_OF[batch.status]
    # Claim the batch: of two finalizers (sweeper and a reader) only one goes on.
    if not _move(session, batch.id, FINALIZING, (batch.status,), finalizing_at=now):
        session.refresh(batch)
        return False
    if expiring:
        jobstate.cancel_where(session, Job.batch_id == batch.id)
    session.refresh(batch)
    file_ids = _result_files(session, batch, final)
    _move(session, batch.id, final, (FINALIZING,), **file_ids, **{_STAMP[final]: utcnow()})
    session.refresh(batch)
    webhooks.record_batch_event(session, batch)
    return True


def _result_files(session: Session, batch: Batch, final: BatchStatus) -> dict[str, str]:
    """Record the batch's output and error files (their content is made from the job
    rows when read); returns the batch columns naming them."""
    sizes = {"output": [0, 0], "error": [0, 0]}  # bytes, lines
    for kind, line in result_lines(session, batch, kind=None, status=final):
        sizes[kind][0] += len(line)
        sizes[kind][1] += 1
    ids: dict[str, str] = {}
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
            created_at=utcnow(),
        )
        session.add(file)
        ids[f"{kind}_file_id"] = file.id
    session.flush()
    return ids


def _due(after: str, limit: int) -> Any:
    """Open batches that may be finalizable, in id order after ``after``: those with
    finished jobs not yet folded into their counts, whose counts are complete, that
    are cancelling (or were left finalizing), or that are past their expiry. The
    rest cannot have changed, so however many batches are open, a pass is cheap
    and none is starved."""
    unfolded = select(BatchTally.id).where(BatchTally.batch_id == Batch.id).exists()
    return (
        select(Batch.id)
        .where(
            Batch.status.in_(BATCH_OPEN),
            Batch.id > after,
            or_(
                unfolded,
                Batch.completed_count + Batch.failed_count >= Batch.total,
                Batch.status.in_((CANCELLING, FINALIZING)),
                Batch.expires_at < utcnow(),
            ),
        )
        .order_by(Batch.id)
        .limit(limit)
    )


def finalize_due(session_factory: Callable[[], Any], *, limit: int = 100) -> int:
    """Finalize the open batches that can be (the feeder and the sweeper call this),
    ``limit`` at a time until none is left; each in its own transaction. Returns how
    many were finalized."""
    done = 0
    after = ""
    while True:
        with session_factory() as session:
            ids = list(session.scalars(_due(after, limit)))
        for batch_id in ids:
            with session_factory() as session:
                tally.fold(session, batch_id)
                session.commit()
                batch = session.get(Batch, batch_id)
                if batch is not None and finalize(session, batch):
                    session.commit()
                    done += 1
        if len(ids) < limit:
            return done
        after = ids[-1]
