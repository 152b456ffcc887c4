"""A worker's claim reads the rows of its own ids, however many jobs are queued and
whatever PostgreSQL's statistics say.

Behind a large batch a million jobs are queued. A claim that named their status
next to its ids let the planner, whose statistics were stale (for minutes after a
large ingest, until autovacuum analyzes the table), meet the ids through
``ix_job_status``: every claim of 30 ids read every queued job's entry, 70-130 ms
each at a million, and a 1M-line batch ran at 200 jobs/s instead of 350.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from core import jobstate
from core.db import get_engine, get_sessionmaker
from tests.sqlplans import postgres_job_reads, statements_of

QUEUED_JOBS = 20_000
CLAIMED = 32


def insert_jobs(url: str, count: int, *, status: str, start: int = 0) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO job (id, status, prompt, model, params, attempts, created_at)"
                " SELECT 'job_' || lpad(g::text, 12, '0'), :status, 'p', 'fake', '{}', 0, now()"
                " FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g"
            ),
            {"status": status, "first": start, "last": start + count - 1},
        )


def claim_reads(url: str) -> list[tuple[str, list[tuple[str | None, float]]]]:
    """Claims ``CLAIMED`` queued jobs (rolled back), then reads each statement's plan."""
    ids = [f"job_{n:012d}" for n in range(100, 100 + 2 * CLAIMED, 2)]
    engine = get_engine(url)
    claims: list[jobstate.Claim] = []

    def claim() -> None:
        with get_sessionmaker(url)() as session:
            found, _ = jobstate.claim_fresh(session, ids, worker="w", lease_s=60)
            claims.extend(found)
            session.rollback()

    ran = statements_of(engine, claim)
    assert [c.job_id for c in claims] == ids
    job_statements = [(s, p) for s, p in ran if " job" in s]
    assert job_statements
    return [(s, postgres_job_reads(engine, s, p)) for s, p in job_statements]


@pytest.mark.parametrize("statistics", ["none", "from_a_quiet_moment", "fresh"])
def test_a_claim_reads_its_own_rows_however_many_jobs_are_queued(
    postgres_url: str, statistics: str
) -> None:
    """Statistics none (a new table), from a quiet moment (few queued jobs, then a
    large batch arrived) or fresh: each claim statement reads about its own rows."""
    if statistics == "from_a_quiet_moment":
        insert_jobs(postgres_url, QUEUED_JOBS, status="succeeded", start=QUEUED_JOBS)
        insert_jobs(postgres_url, 5, status="queued", start=3 * QUEUED_JOBS)
        with get_engine(postgres_url).begin() as conn:
            conn.execute(text("ANALYZE job"))
    insert_jobs(postgres_url, QUEUED_JOBS, status="queued")
    if statistics == "fresh":
        with get_engine(postgres_url).begin() as conn:
            conn.execute(text("ANALYZE job"))
    for statement, reads in claim_reads(postgres_url):
        assert sum(rows for _, rows in reads) <= 4 * CLAIMED, (statement, reads)
        assert {index for index, _ in reads} <= {"pk_job", None}, (statement, reads)
