"""No deadlocks between a worker's writes, with real concurrent transactions on
PostgreSQL: a store takes its row locks in id order, and lease renewals skip rows
another transaction holds (core.locking)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core import delivery, jobstate, submit
from core.db import get_sessionmaker
from core.models import Job
from core.schemas import JobCreate
from core.settings import Settings

pytestmark = pytest.mark.integration

OUTCOME = jobstate.Outcome(
    outputs=["done"],
    finish_reasons=["length"],
    prompt_tokens=3,
    completion_tokens=1,
    model_revision="fake",
    torch_version="-",
    transformers_version="-",
)


def session(url: str) -> Session:
    """A session whose lock waits give up after 20 s (a failing test ends, never hangs)."""
    s = get_sessionmaker(url)()
    s.execute(text("SET lock_timeout = '20s'"))
    return s


def two_claims(url: str, tmp: Any) -> tuple[jobstate.Claim, jobstate.Claim]:
    """Two running jobs of one group (one lease token), ids A < B."""
    settings = Settings(data_dir=tmp, database_url=url, model="fake", require_auth=False)
    with session(url) as s:
        bodies = [JobCreate(prompt="a"), JobCreate(prompt="b")]
        made, _ = submit.submit_jobs(s, None, bodies, settings=settings)
        claims, _ = jobstate.claim_fresh(s, [j.id for j in made], worker="w", lease_s=60)
        s.commit()
    a, b = sorted(claims, key=lambda c: c.job_id)
    return a, b


class Other:
    """Runs ``fn(session)`` and commits in a thread: a second concurrent transaction."""

    def __init__(self, url: str, fn: Callable[[Session], object]) -> None:
        self.error: BaseException | None = None
        self.pid: int | None = None
        self._url, self._fn = url, fn
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with session(self._url) as s:
                self.pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
                self._fn(s)
                s.commit()
        except BaseException as exc:  # reported to the test
            self.error = exc

    def done_or_waiting(self, url: str) -> bool:
        """Wait until the thread has finished or is blocked on a lock."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                return True
            with session(url) as s:
                waiting = s.execute(
                    text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"),
                    {"p": self.pid},
                ).scalar()
            if waiting:
                return True
            time.sleep(0.05)
        return False


def test_a_renewal_during_a_store_makes_no_wait_cycle(postgres_url: str, tmp_path: Any) -> None:
    a, b = two_claims(postgres_url, tmp_path)
    store = session(postgres_url)
    # The group finished B first: its result is stored, the transaction still open.
    assert jobstate.store_outcomes(store, [(b, OUTCOME)]) == [True]
    # Meanwhile the monitor renews the group's leases (A and B) in its own transaction.
    renewal = Other(postgres_url, lambda s: delivery.renew_leases(s, [a, b], lease_s=60))
    assert renewal.done_or_waiting(postgres_url)
    # Now A finishes, in the same store transaction. Were the renewal holding A while
    # waiting for B, this would be a wait cycle: PostgreSQL aborts one of the two.
    assert jobstate.store_outcomes(store, [(a, OUTCOME)]) == [True]
    store.commit()
    store.close()
    renewal.thread.join(timeout=30)
    assert renewal.error is None
    with session(postgres_url) as s:
        statuses = set(s.scalars(select(Job.status).where(Job.id.in_([a.job_id, b.job_id]))))
    assert statuses == {"succeeded"}


def test_a_store_locks_its_rows_in_id_order(postgres_url: str, tmp_path: Any) -> None:
    a, b = two_claims(postgres_url, tmp_path)
    holder = session(postgres_url)
    holder.execute(select(Job.id).where(Job.id == a.job_id).with_for_update())  # A is held
    # The group's results come in completion order: B, then A.
    store = Other(postgres_url, lambda s: jobstate.store_outcomes(s, [(b, OUTCOME), (a, OUTCOME)]))
    assert store.done_or_waiting(postgres_url)
    assert store.thread.is_alive()  # waiting for A
    # While it waits for A it must hold nothing after A (B): else any writer taking A
    # then B (a renewal, a batch cancel) would close a wait cycle with it.
    with session(postgres_url) as probe:
        try:
            probe.execute(select(Job.id).where(Job.id == b.job_id).with_for_update(nowait=True))
        except OperationalError:
            pytest.fail("the store holds B while it waits for A")
        probe.rollback()
    holder.rollback()
    holder.close()
    store.thread.join(timeout=30)
    assert store.error is None
