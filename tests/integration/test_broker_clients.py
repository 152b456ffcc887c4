"""The producer's broker clients (core.broker, core.queue): queue depths right after
asking for a queue that does not exist, on Redis and on RabbitMQ; and one Redis client
per channel, not one per command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis

from core.queue import CeleryQueue, queue_name
from core.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.helpers import unique_queue, wait_until

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _reachable(url: str) -> bool:
    try:
        with kombu.Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


@pytest.fixture(params=["redis", "amqp"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[CeleryQueue, str]]:
    url = REDIS_URL if request.param == "redis" else AMQP_URL
    if not _reachable(url):
        pytest.skip(f"no broker at {url}")
    settings = Settings(data_dir=tmp_path, broker_url=url, queue=unique_queue(), model="fake")
    celery_queue = CeleryQueue(settings)
    yield celery_queue, settings.queue
    with celery_queue._app.connection_for_write() as conn, conn.channel() as channel:
        for lane in ("normal", "high"):
            with contextlib.suppress(Exception):
                channel.queue_delete(queue_name(settings.queue, "fake", lane))


def test_depth_is_right_after_asking_for_a_queue_that_does_not_exist(
    queue: tuple[CeleryQueue, str],
) -> None:
    celery_queue, prefix = queue
    normal, missing = (queue_name(prefix, "fake", lane) for lane in ("normal", "high"))
    assert celery_queue.depth(missing) == 0
    celery_queue.enqueue("job_1", model="fake")
    celery_queue.enqueue("job_2", model="fake")
    # RabbitMQ counts a message once it has routed it (publishing does not wait for that).
    wait_until(lambda: celery_queue.depth(normal) == 2, 10, "both messages counted")
    # On RabbitMQ a failed passive declare closes its channel: the next ask still works.
    for _ in range(3):
        assert celery_queue.depth(missing) == 0
        assert celery_queue.depth(normal) == 2
    # Redis says how many ids the messages hold; RabbitMQ only how many messages wait.
    redis_broker = celery_queue._app.conf.broker_url.startswith("redis")
    per_message = 1 if redis_broker else celery_queue._settings.jobs_per_message
    assert celery_queue.queued_jobs(normal) == 2 * per_message


def test_a_redis_channel_reuses_one_client_for_its_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, broker_url=REDIS_URL, queue=unique_queue(), model="fake")
    celery_queue = CeleryQueue(settings)
    made: list[Any] = []
    real_init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real_init(self, *args, **kwargs)

    name = queue_name(settings.queue, "fake", "normal")
    celery_queue.enqueue("job_0", model="fake")  # the connection and channel exist now
    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    try:
        for i in range(20):
            celery_queue.enqueue(f"job_{i + 1}", model="fake")
        assert len(made) <= 2, f"{len(made)} Redis clients made for 20 publishes"
    finally:
        monkeypatch.undo()
    try:
        assert celery_queue.depth(name) == 21
    finally:
        redis.Redis.from_url(REDIS_URL).delete(name)
