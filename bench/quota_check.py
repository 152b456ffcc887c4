"""How long the active-jobs quota check takes for an owner with a large batch
queued (core.quotas.check_active_jobs, which holds the owner's lock meanwhile; on
SQLite every owner waits for it):

    python -m bench.quota_check --jobs 200000

One owner: an accepted batch of ``--jobs`` queued job rows (inserted directly) and
10 jobs of no batch, on SQLite (a temporary file) and PostgreSQL (a database
``genq_bench_<hex>``, dropped after). Prints the median and max of ``--repeat``
checks, each its own transaction, for the check as it is and for the count it
made before (every queued and running row of the owner, through
``ix_job_owner_status``: main before issue 12's fix, reproduced here).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

import migrations
from bench._services import postgres_database
from core import quotas
from core.db import get_engine, get_sessionmaker
from core.models import Batch, Job, utcnow
from core.status import BatchStatus, JobStatus

OWNER = "local"
LIMIT = 1_000_000  # GENQ_QUOTA_ACTIVE_JOBS's default

_ROWS = """
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < :jobs)
INSERT INTO job (id, status, prompt, model, params, owner, priority, attempts, created_at,
                 batch_id, custom_id)
SELECT 'job_' || x, 'queued', 'a prompt', 'fake', {params}, :owner, 'low', 0, :at,
       :batch, 'r' || x
FROM n
"""


def fill(url: str, jobs: int) -> None:
    """One owner's accepted batch of ``jobs`` queued rows, and 10 jobs of no batch."""
    factory = get_sessionmaker(url)
    with factory() as session:
        now = utcnow()
        batch = Batch(
            id="batch_bench",
            owner=OWNER,
            status=BatchStatus.IN_PROGRESS,
            endpoint="/v1/completions",
            completion_window="24h",
            total=jobs,
            created_at=now,
            in_progress_at=now,
        )
        session.add(batch)
        session.flush()
        dialect = session.get_bind().dialect.name
        params = "CAST('{}' AS JSON)" if dialect == "postgresql" else "'{}'"
        session.execute(
            text(_ROWS.format(params=params)),
            {"jobs": jobs, "owner": OWNER, "at": now, "batch": "batch_bench"},
        )
        for i in range(10):
            session.add(Job(id=f"loose_{i}", prompt="p", model="fake", params={}, owner=OWNER))
        session.commit()
    with get_engine(url).connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE job"))
        else:
            conn.execute(text("ANALYZE"))
            conn.commit()


def main_count(session: Session, owner: str, limit: int) -> None:
    """The count the check made before: every queued and running row of the owner."""
    quotas.lock_owner(session, owner)
    active = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
    inner = select(Job.id).where(Job.owner == owner, Job.status.in_(active)).limit(limit)
    session.scalar(select(func.count()).select_from(inner.subquery()))


def now_check(session: Session, owner: str, limit: int) -> None:
    quotas.check_active_jobs(session, owner, 1, limit)


def timed(
    url: str, call: Callable[[Session, str, int], None], repeat: int, limit: int
) -> list[float]:
    factory = get_sessionmaker(url)
    took = []
    for _ in range(repeat):
        with factory() as session:
            start = time.perf_counter()
            call(session, OWNER, limit)
            took.append(time.perf_counter() - start)
            session.rollback()
    return took


@contextlib.contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'genq.db'}"
        yield url
        get_engine(url).dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    databases: dict[str, Callable[[], contextlib.AbstractContextManager[str]]] = {
        "sqlite": sqlite_database,
        "postgresql": postgres_database,
    }
    for name, database in databases.items():
        with database() as url:
            migrations.upgrade(url)
            fill(url, args.jobs)
            for label, call in (("before (main's count)", main_count), ("now", now_check)):
                limit = max(LIMIT, 2 * args.jobs)  # the check passes: all of it runs
                timed(url, call, 3, limit)  # warm the caches
                took = timed(url, call, args.repeat, limit)
                print(f"{name:10} {args.jobs:>9,} batch jobs  {label:22} "
                      f"median {statistics.median(took) * 1000:8.2f} ms  "
                      f"max {max(took) * 1000:8.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
