"""Paced sending: a batch's jobs go to the broker a window at a time.

A batch's job rows are committed unsent (``enqueued_at`` NULL), and wait while the
batch is ``validating`` (its ingest still writing them). The feeder keeps
about ``GENQ_FEED_AHEAD`` job ids per live worker waiting in each queue (model and
priority) and tops the queue up, oldest unsent jobs first, as the workers drain
it (a window is a few seconds of work: at 400 jobs/s, 2,048 ids last 5 s, so a
late top-up does not starve the workers). So the broker holds O(workers x slots)
of a batch, not the whole batch, its
memory stays flat however long the batch, and a web app's job is never sent
behind a flood of messages being written.

A top-up marks the jobs sent (commits) and then sends them: a job exists once its
row does, and a message follows its commit. If the process dies between the two,
the jobs look sent but have no message: the sweeper re-sends queued jobs the
broker does not account for (:mod:`worker.sweeper`). Nothing else is kept in
memory, so the feeder resumes after any restart from the rows alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import workers
from core.models import Batch, Job, utcnow
from core.queue import PRIORITIES, JobQueue, Route, queue_name
from core.settings import Settings, model_id
from core.status import BatchStatus, JobStatus

_VALIDATING = select(Batch.id).where(Batch.status == BatchStatus.VALIDATING.value)
UNSENT = (
    (Job.status == JobStatus.QUEUED.value)
    & Job.enqueued_at.is_(None)
    # Not a batch still being validated (core.batches.staging): its jobs wait for it.
    # In the statement itself, so it reads the batch in the same snapshot as the job.
    & (Job.batch_id.is_(None) | Job.batch_id.not_in(_VALIDATING))
)
"""Queued jobs not yet sent: the jobs of accepted batches waiting for the feeder."""


def take_unsent(session: Session, *, model: str, priority: str, limit: int) -> list[Route]:
    """Mark up to ``limit`` of the oldest unsent jobs of one queue sent (in the
    caller's transaction: send them after it commits). Rows another feeder holds
    are skipped (``ix_job_unsent`` makes this a short index range scan)."""
    ids = list(
        session.scalars(
            select(Job.id)
            .where(UNSENT, Job.model == model, Job.priority == priority)
            .order_by(Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return [Route(job_id, model, priority) for job_id in ids]


def unsend_batch(session: Session, batch_id: str) -> int:
    """Hand the batch's queued jobs back to the feeder (``genq run`` resuming after
    an interruption: their messages may be gone). A duplicate is harmless."""
    result = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED.value)
        .values(enqueued_at=None)
        .execution_options(synchronize_session=False)
    )
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


def feed_once(
    session_factory: Callable[[], Any], queue: JobQueue, settings: Settings
) -> dict[str, int]:
    """Top up every queue of a served model that holds fewer than its window of
    job ids (and by at least half a window, so a top-up sends many messages at
    once); returns the ids sent per queue."""
    with session_factory() as session:
        live = workers.live_models(session, within_s=settings.worker_heartbeat_s * 3)
    served = {settings.model_id, *map(model_id, settings.models), *live}
    sent: dict[str, int] = {}
    for model in sorted(served):
        window = settings.feed_ahead * max(live.get(model, 0), 1)
        for priority in PRIORITIES:
            name = queue_name(settings.queue, model, priority)
            # Messages times the ids a message holds: an upper bound that is cheap
            # to ask for twice a second (the sweeper counts exactly, less often).
            room = window - queue.depth(name) * settings.jobs_per_message
            if room < window // 2:
                continue
            with session_factory() as session:
                routes = take_unsent(session, model=model, priority=priority, limit=room)
                session.commit()
            if routes:
                queue.enqueue_many(routes)
                sent[name] = len(routes)
    return sent
