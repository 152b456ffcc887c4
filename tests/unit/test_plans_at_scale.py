"""What the worker's and the sweeper's statements read does not grow with the jobs
queued behind a large batch, whatever PostgreSQL's statistics say.

Behind a large batch a million jobs are queued. A claim that named their status
next to its ids let the planner, whose statistics were stale (for minutes after a
large ingest, until autovacuum analyzes the table), meet the ids through
``ix_job_status``: every claim of 30 ids read every queued job's entry, 70-130 ms
each at a million, and a 1M-line batch ran at 200 jobs/s instead of 350. The
sweeper counted and searched the sent ones among all of them every 10 s.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import text

from core import batches, delivery, jobstate
from core.batches import statistics
from core.db import get_engine, get_sessionmaker
from core.openai_format import COMPLETIONS_URL
from tests.sqlplans import postgres_job_reads, sqlite_job_plan, statements_of

QUEUED_JOBS = 20_000
CLAIMED = 32
SENT = 40


def insert_jobs(
    url: str, count: int, *, status: str, start: int = 0, sent_s_ago: float | None = None
) -> None:
    """``count`` jobs of ``status`` (unsent, or sent ``sent_s_ago``), ids from ``start``."""
    with get_engine(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO job"
                " (id, status, prompt, model, params, attempts, created_at, enqueued_at)"
                " SELECT 'job_' || lpad(g::text, 12, '0'), :status, 'p', 'fake', '{}', 0,"
                " now(), now() - make_interval(secs => :ago)"
                " FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g"
            ),
            {"status": status, "first": start, "last": start + count - 1, "ago": sent_s_ago},
        )


def analyze(url: str) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(text("ANALYZE job"))


def with_statistics(url: str, stats: str) -> None:
    """``QUEUED_JOBS`` unsent queued jobs (a batch's tail), the table's statistics
    none (a new table), from a quiet moment (few queued jobs, then a large batch
    arrived) or fresh."""
    if stats == "from_a_quiet_moment":
        insert_jobs(url, QUEUED_JOBS, status="succeeded", start=QUEUED_JOBS, sent_s_ago=900)
        insert_jobs(url, 5, status="queued", start=3 * QUEUED_JOBS, sent_s_ago=1)
        analyze(url)
    insert_jobs(url, QUEUED_JOBS, status="queued")
    if stats == "fresh":
        analyze(url)


def job_reads(url: str, call: Any) -> list[tuple[str, list[tuple[str | None, float]]]]:
    """Each statement ``call`` ran on the job table, with what its plan reads."""
    engine = get_engine(url)
    ran = [(s, p) for s, p in statements_of(engine, call) if " job" in s]
    assert ran
    return [(s, postgres_job_reads(engine, s, p)) for s, p in ran]


STATISTICS = ["none", "from_a_quiet_moment", "fresh"]


@pytest.mark.parametrize("stats", STATISTICS)
def test_a_claim_reads_its_own_rows_however_many_jobs_are_queued(
    postgres_url: str, stats: str
) -> None:
    """Each statement of a claim of ``CLAIMED`` jobs reads about their rows, by id."""
    with_statistics(postgres_url, stats)
    ids = [f"job_{n:012d}" for n in range(100, 100 + 2 * CLAIMED, 2)]
    claims: list[jobstate.Claim] = []

    def claim() -> None:
        with get_sessionmaker(postgres_url)() as session:
            found, _ = jobstate.claim_fresh(session, ids, worker="w", lease_s=60)
            claims.extend(found)
            session.rollback()

    for statement, reads in job_reads(postgres_url, claim):
        assert sum(rows for _, rows in reads) <= 8 * CLAIMED, (statement, reads)
        assert {index for index, _ in reads} <= {"pk_job", None}, (statement, reads)
    assert [c.job_id for c in claims] == ids


def sweep(url: str) -> tuple[list[tuple[str, Any]], list[Any]]:
    """The sweeper's count of the queued jobs sent to the broker and its search for
    stale ones among them (rolled back): their SELECT statements, and the answers."""
    answers: list[Any] = []

    def call() -> None:
        with get_sessionmaker(url)() as session:
            answers.append(delivery.queued_counts(session))
            answers.append(
                delivery.stale_queued(
                    session, model="fake", priority="normal", older_than_s=300, limit=10
                )
            )
            session.rollback()

    ran = statements_of(get_engine(url), call)
    return [(s, p) for s, p in ran if s.lstrip().startswith("SELECT")], answers


def sweep_reads(url: str) -> list[Any]:
    """Asserts that the sweep reads the sent jobs, not the unsent ones; its answers."""
    statements, answers = sweep(url)
    engine = get_engine(url)
    for statement, parameters in statements:
        reads = postgres_job_reads(engine, statement, parameters)
        assert sum(rows for _, rows in reads) <= 4 * SENT, (statement, reads)
    return answers


@pytest.mark.parametrize("stats", ["none", "fresh"])
def test_a_sweep_reads_the_sent_jobs_not_the_unsent_tail(postgres_url: str, stats: str) -> None:
    """The sweep reads through ``ix_job_sent``. (With statistics from a quiet moment
    the planner can still misjudge it: a large ingest refreshes them, below.)"""
    with_statistics(postgres_url, stats)
    insert_jobs(postgres_url, SENT, status="queued", start=4 * QUEUED_JOBS, sent_s_ago=600)
    counts, stale = sweep_reads(postgres_url)
    assert counts == {("fake", "normal"): SENT}
    assert [r.job_id for r in stale] == [f"job_{4 * QUEUED_JOBS + n:012d}" for n in range(10)]


def ingest(url: str, lines: int) -> str:
    """A batch of ``lines`` lines created (validated, rows written, accepted)."""
    body = {"model": "fake", "prompt": "p", "max_tokens": 2}
    raw = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": COMPLETIONS_URL, "body": body})
        for i in range(lines)
    ]
    with get_sessionmaker(url)() as session:
        parsed = batches.parse_openai_file(
            enumerate((line.encode() for line in raw), start=1),
            endpoint=COMPLETIONS_URL,
            models=["fake"],
        )
        batch = batches.create_batch(
            session,
            owner="local",
            input_file_id=None,
            parsed=parsed,
            models=["fake"],
            max_lines=lines,
        )
        assert batch.status == "in_progress"
        return batch.id


def last_analyzed(url: str) -> Any:
    with get_engine(url).connect() as conn:
        return conn.execute(
            text("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'job'")
        ).scalar_one()


def test_a_large_ingest_refreshes_the_statistics_the_sweep_is_planned_by(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statistics from a quiet moment (20,000 finished jobs, 5 queued), then a batch
    of 7.5% of the table (autovacuum would wait for a tenth): the ingest analyzes
    the table, and the sweep reads the sent jobs only."""
    monkeypatch.setattr(statistics, "MIN_ROWS", 1_000)
    insert_jobs(postgres_url, QUEUED_JOBS, status="succeeded")
    insert_jobs(postgres_url, 5, status="queued", start=3 * QUEUED_JOBS, sent_s_ago=1)
    analyze(postgres_url)
    before = last_analyzed(postgres_url)
    ingest(postgres_url, QUEUED_JOBS * 75 // 1000)
    assert last_analyzed(postgres_url) != before
    insert_jobs(postgres_url, SENT, status="queued", start=4 * QUEUED_JOBS, sent_s_ago=600)
    counts, _ = sweep_reads(postgres_url)
    assert counts == {("fake", "normal"): SENT + 5}


def test_a_small_ingest_leaves_the_statistics_to_autovacuum(postgres_url: str) -> None:
    """Below ``MIN_ROWS`` rows no ANALYZE holds up the create."""
    ingest(postgres_url, 200)
    assert last_analyzed(postgres_url) is None


def test_on_sqlite_the_sweep_reads_through_the_sent_jobs_index(sqlite_url: str) -> None:
    """SQLite's planner, left to itself, counts the sent jobs through ``ix_job_status``
    (every queued job); it is told the index."""
    statements, answers = sweep(sqlite_url)
    assert answers == [{}, []]
    assert len(statements) == 2
    for statement, parameters in statements:
        plan = sqlite_job_plan(get_engine(sqlite_url), statement, parameters)
        assert plan, statement
        assert all("INDEX ix_job_sent" in detail for detail in plan), (statement, plan)
