"""Paced sending (core.feed): a batch reaches the broker a window at a time, oldest
first, topped up as the workers drain it, and resumes from the rows alone."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from core import batches, delivery, feed, feedcursor
from core.batches import staging
from core.db import get_engine, get_sessionmaker
from core.models import Batch, Job
from core.openai_format import COMPLETIONS_URL
from core.queue import Route
from core.settings import Settings
from tests.sqlplans import (
    postgres_job_blocks,
    postgres_job_reads,
    sqlite_job_plan,
    statements_of,
)
from tests.unit.test_batch_ingest import Gate, start

LINES = 100
WINDOW = 16


class CountingQueue:
    """A broker that only counts: the ids waiting, in the order sent."""

    def __init__(self) -> None:
        self.waiting: list[str] = []
        self.sent: list[str] = []

    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        self.enqueue_many([Route(job_id, model or "fake", priority)])

    def enqueue_many(self, routes: Sequence[Route]) -> None:
        self.waiting += [r.job_id for r in routes]
        self.sent += [r.job_id for r in routes]

    def ping(self) -> None:
        pass

    def depth(self, queue: str) -> int:
        return -(-len(self.waiting) // 8)  # messages of up to 8 ids (the default)

    def queued_jobs(self, queue: str) -> int:
        return len(self.waiting)

    def drain(self, count: int) -> None:
        """Workers take ``count`` ids from the front."""
        del self.waiting[:count]


def make_settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        model="fake",
        require_auth=False,
        feed_ahead=WINDOW,
    )


def make_batch(settings: Settings) -> tuple[str, list[str]]:
    lines = []
    for i in range(LINES):
        body = {"model": "fake", "prompt": f"line {i}", "max_tokens": 2}
        request = {"custom_id": f"r{i}", "method": "POST", "url": COMPLETIONS_URL}
        lines.append(json.dumps(request | {"body": body}).encode())
    with get_sessionmaker(settings.resolved_database_url)() as session:
        parsed = batches.parse_openai_file(
            enumerate(lines, start=1), endpoint=COMPLETIONS_URL, models=["fake"]
        )
        batch = batches.create_batch(
            session,
            owner="local",
            input_file_id=None,
            parsed=parsed,
            models=["fake"],
            max_lines=LINES,
            priority="low",
        )
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch.id).order_by(Job.id)))
    return batch.id, ids


def all_but_the_last_sent(settings: Settings, last: int) -> tuple[list[str], CountingQueue, Any]:
    """A batch whose jobs were all sent but the last ``last``: its ids, the broker, and
    the session factory."""
    _, ids = make_batch(settings)
    queue = CountingQueue()
    factory = get_sessionmaker(settings.resolved_database_url)
    while len(queue.sent) < LINES - last:
        queue.drain(WINDOW)
        feed.feed_once(factory, queue, settings)
    return ids, queue, factory


def test_a_batch_is_sent_a_window_at_a_time_in_order(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path)
    _, ids = make_batch(settings)
    queue = CountingQueue()
    factory = get_sessionmaker(settings.resolved_database_url)
    assert queue.sent == []  # creating a batch sends nothing
    feed.feed_once(factory, queue, settings)
    assert queue.sent == ids[:WINDOW]
    feed.feed_once(factory, queue, settings)  # nothing drained: the window is full
    assert queue.sent == ids[:WINDOW]
    queue.drain(WINDOW // 4)  # not yet half a window of room: wait for more
    feed.feed_once(factory, queue, settings)
    assert len(queue.sent) == WINDOW
    queue.drain(WINDOW // 4)
    feed.feed_once(factory, queue, settings)
    assert queue.sent == ids[: WINDOW + WINDOW // 2]
    assert len(queue.waiting) == WINDOW
    while len(queue.sent) < LINES:
        queue.drain(WINDOW)
        feed.feed_once(factory, queue, settings)
        assert len(queue.waiting) <= WINDOW
    assert queue.sent == ids  # each once, oldest first


def test_unsent_jobs_are_not_the_sweepers_to_resend(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path)
    make_batch(settings)
    with get_sessionmaker(settings.resolved_database_url)() as session:
        assert delivery.queued_counts(session) == {}
        stale = delivery.stale_queued(
            session, model="fake", priority="low", older_than_s=0, limit=1000
        )
        assert stale == []


def test_resuming_hands_queued_jobs_back_to_the_feeder(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path)
    batch_id, ids = make_batch(settings)
    factory = get_sessionmaker(settings.resolved_database_url)
    first = CountingQueue()
    feed.feed_once(factory, first, settings)
    # The broker lost its messages and the feeder's process restarted: nothing in
    # memory survives, the rows say what to send.
    with factory() as session:
        assert feed.unsend_batch(session, batch_id) == LINES
        session.commit()
    again = CountingQueue()
    feed.feed_once(factory, again, settings)
    assert again.sent == ids[:WINDOW]


def test_a_top_up_reads_none_of_the_rows_of_a_batch_still_being_validated(
    database_url: str, tmp_path: Path
) -> None:
    """While a large batch is ingested (its rows unsent, waiting for it), top-ups
    send the last jobs of an accepted batch, then have nothing to send, and read no
    row of the one being validated: their cost does not grow with the ingest (it
    did, twice a second, by every row written so far)."""
    settings = make_settings(database_url, tmp_path)
    ids, queue, factory = all_but_the_last_sent(settings, 5)
    gate = Gate(2 * staging.CHUNK_ROWS + 10, pause_at=2 * staging.CHUNK_ROWS + 5)
    thread, outcome = start(database_url, gate)
    try:
        engine = get_engine(settings.resolved_database_url)
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))
        for _ in range(2):  # the last 5; then nothing to send
            queue.drain(WINDOW)
            ran = statements_of(engine, lambda: feed.feed_once(factory, queue, settings))
            reading = [(s, p) for s, p in ran if s.lstrip().startswith("SELECT") and "job" in s]
            assert reading
            for statement, parameters in reading:
                if engine.dialect.name == "postgresql":
                    reads = postgres_job_reads(engine, statement, parameters)
                    # The planner may read the small accepted batch whole; not the other.
                    assert sum(rows for _, rows in reads) <= LINES, (statement, reads)
                else:
                    for detail in sqlite_job_plan(engine, statement, parameters):
                        assert "ix_job_unsent (batch_id=?" in detail, (statement, detail)
        assert queue.sent == ids  # the accepted batch's, each once; none of the other's
    finally:
        gate.release.set()
        thread.join(60)
    assert outcome["batch"].status == "in_progress"


def test_a_top_up_reads_no_row_of_a_validating_batch_with_statistics_from_before_it(
    postgres_url: str, tmp_path: Path
) -> None:
    """PostgreSQL's statistics are those of before the ingest (as they are in service:
    autovacuum analyzes the job table after a tenth of it has changed, a large
    ingest takes seconds): it thinks there are almost no unsent jobs. A top-up
    still probes each batch in progress on its own, and never reads (hashes) every
    unsent row of the batch being validated."""
    settings = make_settings(postgres_url, tmp_path)
    ids, queue, factory = all_but_the_last_sent(settings, 5)
    engine = get_engine(settings.resolved_database_url)
    with engine.begin() as conn:  # the statistics of a quiet moment: 5 unsent jobs
        conn.execute(text("ANALYZE"))
    gate = Gate(4 * staging.CHUNK_ROWS + 10, pause_at=4 * staging.CHUNK_ROWS + 5)
    thread, outcome = start(postgres_url, gate)
    try:
        queue.drain(WINDOW)
        ran = statements_of(engine, lambda: feed.feed_once(factory, queue, settings))
        reading = [(s, p) for s, p in ran if s.lstrip().startswith("SELECT") and "job" in s]
        assert reading
        for statement, parameters in reading:
            reads = postgres_job_reads(engine, statement, parameters)
            assert sum(rows for _, rows in reads) <= LINES, (statement, reads)
        assert queue.sent == ids
    finally:
        gate.release.set()
        thread.join(60)
    assert outcome["batch"].status == "in_progress"


def jobs_sent(factory: Any, batch_id: str) -> list[str]:
    with factory() as session:
        return list(
            session.scalars(
                select(Job.id)
                .where(Job.batch_id == batch_id, Job.enqueued_at.is_not(None))
                .order_by(Job.id)
            )
        )


def test_a_job_unsent_again_behind_the_cursor_is_sent_when_the_tail_runs_short(
    database_url: str, tmp_path: Path
) -> None:
    """Top-ups read after the last id they took (core.feedcursor); a job below it
    that is unsent again (another feeder's take rolled back) is not lost: the top-up
    that finds too few ids after the cursor reads the rows behind it too."""
    settings = make_settings(database_url, tmp_path)
    batch_id, ids = make_batch(settings)
    queue = CountingQueue()
    factory = get_sessionmaker(settings.resolved_database_url)
    feed.feed_once(factory, queue, settings)
    assert queue.sent == ids[:WINDOW]
    with factory() as session:  # the third job's take rolled back
        session.execute(text("UPDATE job SET enqueued_at = NULL WHERE id = :id"), {"id": ids[2]})
        session.commit()
    queue.drain(WINDOW)
    feed.feed_once(factory, queue, settings)
    assert queue.sent[WINDOW:] == ids[WINDOW : 2 * WINDOW]  # after the cursor, in order
    while len(queue.sent) < LINES + 1:
        queue.drain(WINDOW)
        sent_before = len(queue.sent)
        feed.feed_once(factory, queue, settings)
        assert len(queue.sent) > sent_before, "a top-up sent nothing while a job was unsent"
    assert sorted(queue.sent) == sorted([*ids, ids[2]])  # every job; the third once more
    assert queue.sent[-1] == ids[2]  # found behind the cursor at the tail
    assert jobs_sent(factory, batch_id) == ids


def test_the_rows_behind_the_cursor_are_read_again_when_due(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only at the tail: a job left behind the cursor is sent at the next look
    behind (at least every ``LOOK_BEHIND_EVERY_S``), oldest first."""
    settings = make_settings(database_url, tmp_path)
    _, ids = make_batch(settings)
    queue = CountingQueue()
    factory = get_sessionmaker(settings.resolved_database_url)
    feed.feed_once(factory, queue, settings)
    with factory() as session:
        session.execute(text("UPDATE job SET enqueued_at = NULL WHERE id = :id"), {"id": ids[2]})
        session.commit()
    monkeypatch.setattr(feedcursor, "LOOK_BEHIND_EVERY_S", -1.0)  # due now
    queue.drain(WINDOW)
    feed.feed_once(factory, queue, settings)
    assert queue.sent[WINDOW:] == [ids[2], *ids[WINDOW : 2 * WINDOW - 1]]


def test_a_top_up_does_not_step_over_the_jobs_already_sent(
    postgres_url: str, tmp_path: Path
) -> None:
    """A sent job's entry stays in ``ix_job_unsent`` until vacuum removes it, and
    autovacuum may not vacuum the job table during a large batch: a top-up that read
    from the batch's first entry stepped over every job sent so far (at 200k sent,
    top-ups took three times as long; in a 1M-line batch, the largest cost left)."""
    jobs, window = 20_000, 2048
    engine = get_engine(postgres_url)
    factory = get_sessionmaker(postgres_url)
    with factory() as session:
        session.add(
            Batch(
                id="batch_big",
                owner="local",
                status="in_progress",
                endpoint=COMPLETIONS_URL,
                completion_window="24h",
                total=jobs,
                priority="low",
            )
        )
        session.commit()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE job SET (autovacuum_enabled = false)"))
        conn.execute(
            text(
                "INSERT INTO job (id, status, prompt, model, params, attempts, created_at,"
                " batch_id, priority) SELECT 'job_' || lpad(g::text, 12, '0'), 'queued',"
                " 'p', 'fake', '{}', 0, now(), 'batch_big', 'low'"
                " FROM generate_series(1, :n) AS g"
            ),
            {"n": jobs},
        )
        conn.execute(text("ANALYZE job"))

    def top_up() -> list[Route]:
        with factory() as session:
            routes = feed.take_unsent(
                session, batch_ids=["batch_big"], model="fake", priority="low", limit=window
            )
            session.commit()
        return routes

    for _ in range(8):  # 16,384 sent
        assert len(top_up()) == window
    ran = statements_of(engine, top_up)
    reading = [(s, p) for s, p in ran if s.lstrip().startswith("SELECT") and "job" in s]
    assert reading
    for statement, parameters in reading:
        blocks = postgres_job_blocks(engine, statement, parameters)
        # Page visits: about one of the index and one of the table for each of the
        # window's rows (3,198 measured); read from the batch's first entry, 23,109.
        assert blocks <= 2 * window, (statement, blocks)


def test_feeders_of_several_processes_send_each_job_once_though_takes_roll_back(
    postgres_url: str, tmp_path: Path
) -> None:
    """Three feeders, each with the cursors of a process of its own, top the same
    batch up at once in real concurrent transactions; every third take of each rolls
    back (its jobs left behind every cursor). Every job is sent, by one committed
    take only."""
    settings = make_settings(postgres_url, tmp_path)
    batch_id, ids = make_batch(settings)
    factory = get_sessionmaker(settings.resolved_database_url)
    committed: list[list[str]] = []
    lock = threading.Lock()
    start_together = threading.Barrier(3)

    def feeder() -> None:
        cursors = feedcursor.FeedCursors()
        start_together.wait()
        for take in range(1000):
            with factory() as session:
                routes = feed.take_unsent(
                    session,
                    batch_ids=[batch_id],
                    model="fake",
                    priority="low",
                    limit=3,
                    cursors=cursors,
                )
                if not routes:
                    return
                time.sleep(0.001)  # the others' takes overlap this one
                if take % 3 == 2:
                    session.rollback()
                    continue
                session.commit()
            with lock:
                committed.append([route.job_id for route in routes])

    threads = [threading.Thread(target=feeder) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    sent = [job_id for take in committed for job_id in take]
    assert sorted(sent) == ids  # each once
    assert jobs_sent(factory, batch_id) == ids
