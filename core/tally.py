"""A batch's request counts, kept as its jobs finish: status reads in constant time.

Every transition of a job into a final status (:mod:`core.jobstate`) calls
:func:`record_final` in its own transaction, which inserts one ``batch_tally`` row
per batch it touched: how many of its jobs succeeded (with their token usage) and
how many failed or were cancelled. Inserting, not updating the batch row, keeps
workers from queueing on one hot row (and out of any lock cycle with a batch
cancel, which holds the batch row while it cancels job rows).

:func:`fold` (run by the feeder's finalizing pass) moves a batch's tally rows
into its counters; :func:`read` adds the counters and the rows not folded yet in
one statement (one snapshot), so a read never sees a fold half done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    ScalarSelect,
    Table,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from core.models import Batch, BatchTally, Job
from core.status import JobStatus


@dataclasses.dataclass
class Tally:
    """What has finished of a batch."""

    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def record_final(session: Session, job_ids: Collection[str]) -> None:
    """Count these jobs, which reached a final status in the caller's transaction,
    towards their batches (jobs of no batch are ignored): one statement, which
    inserts a tally row per batch from the job rows themselves."""
    if not job_ids:
        return
    succeeded = Job.status == JobStatus.SUCCEEDED.value

    def of_succeeded(value: Any) -> Any:
        return func.coalesce(func.sum(case((succeeded, value), else_=0)), 0)

    per_batch = (
        select(
            Job.batch_id,
            of_succeeded(1),
            func.coalesce(func.sum(case((succeeded, 0), else_=1)), 0),
            of_succeeded(func.coalesce(Job.prompt_tokens, 0)),
            of_succeeded(func.coalesce(Job.completion_tokens, 0)),
        )
        .where(Job.id.in_(list(job_ids)), Job.batch_id.is_not(None))
        .group_by(Job.batch_id)
    )
    columns = ["batch_id", "completed", "failed", "prompt_tokens", "completion_tokens"]
    table = cast(Table, BatchTally.__table__)  # Core: the ORM's bulk path costs more
    session.connection().execute(insert(table).from_select(columns, per_batch))


def _pending(column: Any) -> Any:
    """The sum of ``column`` over the enclosing batch's unfolded tally rows."""
    return (
        select(func.coalesce(func.sum(column), 0))
        .where(BatchTally.batch_id == Batch.id)
        .scalar_subquery()
    )


def read(session: Session, batch_id: str) -> Tally:
    """The batch's counts: its counters plus its unfolded tally rows, in one statement."""
    row = session.execute(
        select(
            Batch.completed_count + _pending(BatchTally.completed),
            Batch.failed_count + _pending(BatchTally.failed),
            Batch.prompt_tokens + _pending(BatchTally.prompt_tokens),
            Batch.completion_tokens + _pending(BatchTally.completion_tokens),
        ).where(Batch.id == batch_id)
    ).one_or_none()
    if row is None:
        return Tally()
    return Tally(*(int(value) for value in row))


def unfinished(batches: ColumnElement[bool]) -> ScalarSelect[Any]:
    """The requests not final yet of the batches matching ``batches``, summed, as a
    scalar subquery: each batch's ``total`` less its counters and its unfolded tally
    rows (never below 0), so no job row is read, whatever the batches' size.

    Exact for a batch whose ``total`` is its job rows (from ``in_progress`` on):
    every move of a job into a final status inserts its tally row in the same
    transaction (:func:`record_final`), so one snapshot sees both or neither."""
    left = (
        Batch.total
        - Batch.completed_count
        - Batch.failed_count
        - _pending(BatchTally.completed + BatchTally.failed)
    )
    each = select(left.label("remaining")).where(batches).subquery()
    return select(
        func.coalesce(func.sum(case((each.c.remaining > 0, each.c.remaining), else_=0)), 0)
    ).scalar_subquery()


def fold(session: Session, batch_id: str) -> None:
    """Move the batch's tally rows into its counters (in the caller's transaction).
    Rows a concurrent transaction inserts meanwhile are left for the next fold."""
    rows = session.execute(
        delete(BatchTally)
        .where(BatchTally.batch_id == batch_id)
        .returning(
            BatchTally.completed,
            BatchTally.failed,
            BatchTally.prompt_tokens,
            BatchTally.completion_tokens,
        )
    ).all()
    if not rows:
        return
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(
            completed_count=Batch.completed_count + sum(r[0] for r in rows),
            failed_count=Batch.failed_count + sum(r[1] for r in rows),
            prompt_tokens=Batch.prompt_tokens + sum(r[2] for r in rows),
            completion_tokens=Batch.completion_tokens + sum(r[3] for r in rows),
        )
        .execution_options(synchronize_session=False)
    )
