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
broker does not account for (:mod:`worker.sweeper`). Nothing else is kept but a
hint of where the last top-up ended (:mod:`core.feedcursor`), so the feeder resumes
after any restart from the rows alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from core import workers
from core.feedcursor import CURSORS, FeedCursors
from core.models import UNSENT_JOBS, Batch, Job, job_column, job_through, utcnow
from core.queue import PRIORITIES, JobQueue, Route, queue_name
from core.settings import Settings, model_id
from core.status import BatchStatus, JobStatus

# Queued jobs not yet sent (:data:`core.models.UNSENT_JOBS`): only a batch's jobs are
# ever unsent (core.submit sends the others with their commit), and only an
# ``in_progress`` batch's are sent: a validating batch's jobs wait for it
# (core.batches.staging).


def _unsent_jobs(dialect: str) -> Any:
    """The job table, read through ``ix_job_unsent``: left to itself SQLite takes
    ``ix_job_batch_id`` for ``batch_id = ?``, every row of the batch, sent or not."""
    return job_through("ix_job_unsent", dialect)


def _database(session: Session) -> str:
    """The session's database, as the feed cursors know it."""
    return str(session.get_bind().engine.url)


def batches_to_feed(session: Session) -> list[tuple[str, str]]:
    """``(id, priority)`` of the ``in_progress`` batches with unsent jobs, oldest
    first (a batch's jobs have its priority). One probe of ``ix_job_unsent`` per
    batch in progress: a batch still being validated is not read at all."""
    batch = Batch.__table__.c  # Core columns: the ORM takes no text FROM
    dialect = session.get_bind().dialect.name
    has_unsent = (
        select(job_column("id"))
        .select_from(_unsent_jobs(dialect))
        .where(job_column("batch_id") == batch.id, text(UNSENT_JOBS))
    )
    if dialect == "postgresql":
        # A probe per batch, whatever the statistics. Left to itself PostgreSQL makes
        # the EXISTS a semi-join, and with statistics from before a large ingest (in
        # service, autovacuum analyzes the job table after a tenth of it changed) it
        # hashes the whole index, every row of the batch being validated included.
        # OFFSET keeps the subquery a subplan, run per batch; in the index's order, a
        # plan other than the index's range (which stops at its first entry) would
        # read every unsent job of the batch.
        has_unsent = has_unsent.order_by(*map(job_column, ("model", "priority", "id"))).offset(0)
    rows = session.execute(
        select(batch.id, batch.priority)
        .where(batch.status == BatchStatus.IN_PROGRESS.value, has_unsent.exists())
        .order_by(batch.created_at, batch.id)
    )
    return [(batch_id, priority) for batch_id, priority in rows]


def take_unsent(
    session: Session,
    *,
    batch_ids: Sequence[str],
    model: str,
    priority: str,
    limit: int,
    cursors: FeedCursors = CURSORS,
) -> list[Route]:
    """Mark up to ``limit`` of the unsent jobs of one queue sent, from the batches
    ``batch_ids`` in that order, each's oldest after the cursor first (in the
    caller's transaction: send them after it commits). Rows another feeder holds are
    skipped. ``ix_job_unsent`` makes each batch's part a short index range scan, which
    starts after the last id this process took (``cursors``, :mod:`core.feedcursor`);
    a job unsent again behind it goes at the next look behind, within a minute."""
    database = _database(session)
    ids: list[str] = []
    for batch_id in batch_ids:
        if len(ids) >= limit:
            break
        key = (database, batch_id, model, priority)
        after = cursors.after(key)
        taken = _unsent_ids(session, key, limit - len(ids), after=after)
        if taken:  # ids are read in order: the last is the highest
            cursors.advance(key, taken[-1], looked_behind=after is None)
        if after is not None and len(ids) + len(taken) < limit:
            # The ids after the cursor ran short: a job below it may be unsent again.
            taken += _unsent_ids(session, key, limit - len(ids) - len(taken), upto=after)
            cursors.advance(key, after, looked_behind=True)
        ids += taken
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return [Route(job_id, model, priority) for job_id in ids]


def _unsent_ids(
    session: Session,
    key: tuple[str, str, str, str],
    limit: int,
    *,
    after: str | None = None,
    upto: str | None = None,
) -> list[str]:
    """Up to ``limit`` unsent job ids of one batch queue, in id order, locked
    (skipping rows another feeder holds), above ``after`` or up to ``upto``."""
    _, batch_id, model, priority = key
    query = (
        select(job_column("id"))
        .select_from(_unsent_jobs(session.get_bind().dialect.name))
        .where(
            job_column("batch_id") == batch_id,
            job_column("model") == model,
            job_column("priority") == priority,
            text(UNSENT_JOBS),
        )
    )
    if after is not None:
        query = query.where(job_column("id") > after)
    if upto is not None:
        query = query.where(job_column("id") <= upto)
    return list(
        session.scalars(
            query.order_by(job_column("id")).limit(limit).with_for_update(skip_locked=True)
        )
    )


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
    # Its jobs are behind this process's cursors. Another process's feeder (a worker)
    # finds them at its next look behind; this one's next top-up reads from the start.
    CURSORS.forget(_database(session), [batch_id])
    return count


def feed_once(
    session_factory: Callable[[], Any], queue: JobQueue, settings: Settings
) -> dict[str, int]:
    """Top up every queue of a served model that holds fewer than its window of
    job ids (and by at least half a window, so a top-up sends many messages at
    once); returns the ids sent per queue."""
    with session_factory() as session:
        fed = batches_to_feed(session)
        CURSORS.keep_only(_database(session), (batch_id for batch_id, _ in fed))
        if not fed:  # most ticks: no broker call at all
            return {}
        live = workers.live_models(session, within_s=settings.worker_heartbeat_s * 3)
    served = {settings.model_id, *map(model_id, settings.models), *live}
    sent: dict[str, int] = {}
    for model in sorted(served):
        window = settings.feed_ahead * max(live.get(model, 0), 1)
        for priority in PRIORITIES:
            batch_ids = [batch_id for batch_id, of in fed if of == priority]
            if not batch_ids:
                continue
            name = queue_name(settings.queue, model, priority)
            # Messages times the ids a message holds: an upper bound that is cheap
            # to ask for twice a second (the sweeper counts exactly, less often).
            room = window - queue.depth(name) * settings.jobs_per_message
            if room < window // 2:
                continue
            with session_factory() as session:
                routes = take_unsent(
                    session, batch_ids=batch_ids, model=model, priority=priority, limit=room
                )
                session.commit()
            if routes:
                queue.enqueue_many(routes)
                sent[name] = len(routes)
    return sent
