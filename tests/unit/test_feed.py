"""Paced sending (core.feed): a batch reaches the broker a window at a time, oldest
first, topped up as the workers drain it, and resumes from the rows alone."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from core import batches, delivery, feed
from core.batches import staging
from core.db import get_engine, get_sessionmaker
from core.models import Job
from core.openai_format import COMPLETIONS_URL
from core.queue import Route
from core.settings import Settings
from tests.sqlplans import postgres_job_reads, sqlite_job_plan, statements_of
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
