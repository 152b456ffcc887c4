"""The sweeper compares jobs with jobs: jobs whose messages are still waiting in Redis
are not re-sent, however long they wait; jobs whose messages were lost are. A normal
job's message may wait in its model's normal queue or, for a short job, in the express
queue: both count."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from core import submit
from core.db import session_scope
from core.express import EXPRESS_BURST
from core.models import Job
from core.queue import CeleryQueue, queue_name
from core.schemas import JobCreate
from core.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.helpers import unique_queue
from worker.sweeper import Sweeper

pytestmark = pytest.mark.integration

JOBS = 200  # half of them short: the owner's express burst (16) goes to express
Setup = tuple[Settings, CeleryQueue, str, str]


@pytest.fixture
def setup(postgres_url: str, tmp_path: Path) -> Iterator[Setup]:
    """Settings on PostgreSQL and a fresh Redis queue, a short re-send age, no worker."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=REDIS_URL,
        queue=unique_queue(),
        model="fake",
        require_auth=False,
        requeue_after_s=0.5,
    )
    normal = queue_name(settings.queue, "fake", "normal")
    yield settings, CeleryQueue(settings), normal, queue_name(settings.queue, "fake", "express")
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"*{settings.queue}*"))
    if keys:
        client.delete(*keys)
    client.close()


def submit_all(settings: Settings, queue: CeleryQueue) -> None:
    """JOBS normal jobs: short ones (the express queue) and long ones, alternating."""
    bodies = [
        JobCreate(prompt=f"prompt {i}", max_new_tokens=4 if i % 2 else 64) for i in range(JOBS)
    ]
    with session_scope(settings.resolved_database_url) as session:
        submit.submit_jobs(session, queue, bodies, settings=settings)


def queued_jobs(queue: CeleryQueue, *names: str) -> int:
    return sum(queue.queued_jobs(name) for name in names)


def test_no_resend_while_every_job_still_has_its_message(setup: Setup) -> None:
    settings, queue, normal, express = setup
    submit_all(settings, queue)
    assert queue.queued_jobs(express) == EXPRESS_BURST
    assert queue.queued_jobs(normal) == JOBS - EXPRESS_BURST
    sweeper = Sweeper(settings, queue, holder="test")
    # The messages wait longer than requeue_after_s, sweep after sweep (no worker).
    resent = []
    for _ in range(3):
        time.sleep(settings.requeue_after_s * 2)
        resent.append(sweeper.sweep_once()["resent"])
    assert resent == [0, 0, 0]
    assert queued_jobs(queue, normal, express) == JOBS


def test_jobs_whose_messages_were_lost_are_resent(setup: Setup) -> None:
    settings, queue, normal, express = setup
    submit_all(settings, queue)
    client = redis.Redis.from_url(REDIS_URL)
    client.rpop(express, 2)  # two messages lost: 16 jobs no message will deliver
    assert queue.queued_jobs(express) == EXPRESS_BURST - 16
    client.close()
    assert queued_jobs(queue, normal, express) == JOBS - 16
    time.sleep(settings.requeue_after_s * 2)
    report = Sweeper(settings, queue, holder="test").sweep_once()
    # The sweeper cannot tell which jobs lost their message: it re-sends the stale
    # ones (a duplicate is harmless: a claim is conditional).
    assert report["resent"] == JOBS
    assert queued_jobs(queue, normal, express) == 2 * JOBS - 16


def test_resent_messages_leave_after_the_commit(setup: Setup) -> None:
    """A worker taking a re-sent message must find its job's row free: the sweeper
    sends only once its transaction (which marks the jobs re-sent) has committed."""
    settings, queue, normal, express = setup
    submit_all(settings, queue)
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(normal, express)  # every message lost
    client.close()
    time.sleep(settings.requeue_after_s * 2)
    seen_locked: list[bool] = []

    class Probe(CeleryQueue):
        def enqueue_many(self, routes: Any) -> None:
            ids = [route.job_id for route in routes]
            with session_scope(settings.resolved_database_url) as session:
                free = session.scalars(
                    select(Job.id).where(Job.id.in_(ids)).with_for_update(skip_locked=True)
                )
                seen_locked.append(len(list(free)) != len(ids))
            super().enqueue_many(routes)

    report = Sweeper(settings, Probe(settings), holder="test").sweep_once()
    assert report["resent"] == JOBS
    assert seen_locked == [False]
