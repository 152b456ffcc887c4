"""The active-jobs quota counts an owner's queued and running jobs exactly, without
reading a batch's job rows (core.quotas.active_jobs): jobs of no batch through a
partial index, a batch's from its counters (core.tally), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from core import batches, jobstate, quotas, tally
from core.batches import staging
from core.db import get_engine, get_sessionmaker
from core.models import Batch, Job, utcnow
from core.openai_format import ParsedRequest
from core.schemas import GenerationParams
from core.status import JobStatus
from tests.sqlplans import postgres_job_reads, sqlite_job_plan, statements_of
from tests.unit.test_batch_ingest import Gate, start
from tests.unit.test_tally import OUTCOME

OWNER = "bulk"  # the owner of tests.unit.test_batch_ingest's batches
MANY = 10**6


def requests(n: int) -> Iterator[tuple[int, ParsedRequest]]:
    params = GenerationParams(max_new_tokens=2)
    for i in range(n):
        yield i + 1, ParsedRequest(f"r{i}", f"line {i}", "fake", params)


def make_batch(url: str, n: int) -> tuple[str, list[str]]:
    """An accepted batch of ``n`` queued jobs of :data:`OWNER`, and their ids."""
    with get_sessionmaker(url)() as session:
        batch = batches.create_batch(
            session,
            owner=OWNER,
            input_file_id=None,
            parsed=requests(n),
            models=["fake"],
            max_lines=n,
        )
        assert batch.status == "in_progress"
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch.id).order_by(Job.id)))
    return batch.id, ids


def loose_job(session: Session, job_id: str, owner: str = OWNER) -> None:
    session.add(Job(id=job_id, prompt="p", model="fake", params={}, owner=owner))
    session.commit()


def counted(url: str) -> int:
    with get_sessionmaker(url)() as session:
        return quotas.active_jobs(session, OWNER, up_to=MANY)


def truth(url: str) -> int:
    """The owner's queued and running job rows, counted one by one."""
    active = (JobStatus.QUEUED, JobStatus.RUNNING)
    with get_sessionmaker(url)() as session:
        query = select(func.count()).where(Job.owner == OWNER, Job.status.in_(active))
        return session.scalar(query) or 0


def test_a_batchs_unfinished_jobs_are_counted_exactly(database_url: str) -> None:
    url = database_url
    factory = get_sessionmaker(url)
    first, ids = make_batch(url, 12)
    second, _ = make_batch(url, 5)
    with factory() as session:
        loose_job(session, "loose-1")
    steps: list[tuple[str, int, int]] = []

    def check(step: str) -> None:
        steps.append((step, counted(url), truth(url)))

    check("submitted")
    with factory() as session:
        claims, _ = jobstate.claim_fresh(session, ids[:4], worker="w", lease_s=60)
        session.commit()
    check("four running")
    with factory() as session:
        stored = [(claims[0], OUTCOME), (claims[1], jobstate.Failure("boom", "it broke"))]
        jobstate.store_outcomes(session, stored)  # one succeeded, one failed
        session.commit()
    check("two finished, tally rows not folded")
    with factory() as session:
        jobstate.release_job(session, claims[2])  # handed back: queued again
        session.commit()
    check("one handed back to the queue")
    with factory() as session:
        jobstate.cancel_job(session, ids[5])
        session.commit()
    check("one cancelled on its own")
    with factory() as session:
        lapsed, _ = jobstate.claim_fresh(session, ids[6:7], worker="w", lease_s=0.001)
        session.commit()
        assert lapsed
    time.sleep(0.01)  # its lease has lapsed
    with factory() as session:
        _, failed = jobstate.reclaim_expired(session, max_attempts=1)  # quarantined
        session.commit()
        assert failed == ids[6:7]
    check("one failed by the sweeper")
    with factory() as session:
        tally.fold(session, first)
        session.commit()
    check("folded")
    with factory() as session:
        session.execute(
            update(Batch).where(Batch.id == second).values(expires_at=utcnow() - dt.timedelta(1))
        )
        session.commit()
        assert batches.finalize(session, session.get_one(Batch, second))
        session.commit()
    check("the second batch expired")
    with factory() as session:
        batches.cancel_batch(session, first, owner=None)
        session.commit()
    check("the first batch cancelling")
    with factory() as session:  # the last running claim's late result changes nothing
        jobstate.store_outcomes(session, [(claims[3], OUTCOME)])
        session.commit()
    check("a late result of a cancelled job")
    assert [(s, c) for s, c, _ in steps] == [(s, t) for s, _, t in steps]
    assert [c for _, c, _ in steps] == [18, 18, 16, 16, 15, 14, 14, 9, 1, 1]


def test_a_validating_batch_without_a_file_counts_the_rows_written(
    database_url: str, tmp_path: Path
) -> None:
    """``genq run``'s batch has no input file: while its ingest runs, the rows it
    has committed count (from ``batch.ingested``, not by reading them)."""
    gate = Gate(staging.CHUNK_ROWS + 10, pause_at=staging.CHUNK_ROWS + 5)
    thread, outcome = start(database_url, gate)
    try:
        assert counted(database_url) == truth(database_url) == staging.CHUNK_ROWS
    finally:
        gate.release.set()
        thread.join(60)
    assert outcome["batch"].status == "in_progress"
    assert counted(database_url) == truth(database_url) == staging.CHUNK_ROWS + 10


def test_the_check_does_not_read_a_batchs_job_rows(database_url: str) -> None:
    """A submit beside a large batch: the count reads jobs of no batch only (on
    SQLite through ``ix_job_owner_active``; PostgreSQL picks that or ``batch_id``'s
    index by its statistics), never the batch's rows."""
    url = database_url
    make_batch(url, 3000)
    with get_sessionmaker(url)() as session:
        loose_job(session, "loose-1")
        loose_job(session, "loose-2")
        for i in range(50):
            loose_job(session, f"other-{i}", owner="other")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    with get_sessionmaker(url)() as session:
        ran = statements_of(
            engine, lambda: quotas.check_active_jobs(session, OWNER, adding=1, limit=MANY)
        )
        session.rollback()
    [(statement, parameters)] = [(s, p) for s, p in ran if "count(" in s]
    if engine.dialect.name == "postgresql":
        reads = postgres_job_reads(engine, statement, parameters)
        assert reads and sum(rows for _, rows in reads) <= 52, reads
    else:
        on_job = sqlite_job_plan(engine, statement, parameters)
        assert on_job and all("ix_job_owner_active" in d for d in on_job), on_job
