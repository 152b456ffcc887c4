"""Priorities that hold and one queue per model, with real workers on Redis + PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from core.express import EXPRESS_BURST, EXPRESS_RATE_PER_S
from core.settings import Settings
from tests.integration.helpers import unique_queue, wait_until
from tests.integration.test_faults import FAULT_REDIS_URL, Cluster, make_cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def clean_redis() -> redis.Redis:
    client = redis.Redis.from_url(FAULT_REDIS_URL)
    client.flushdb()
    return client


def start_order(cluster: Cluster, ids: list[str]) -> list[str]:
    jobs = cluster.jobs(ids)
    return [job["id"] for job in sorted(jobs, key=lambda job: job["started_at"])]


def test_a_high_priority_job_starts_before_a_low_priority_backlog_drains(
    postgres_url: str, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    cluster = make_cluster(
        postgres_url, tmp_path, "fake:token_delay_s=0.05", GENQ_WORKER_CONCURRENCY="2"
    )
    backlog = cluster.submit([f"bulk job {i}" for i in range(20)], max_new_tokens=8, priority="low")
    with cluster.worker():
        wait_until(
            lambda: cluster.count(backlog, "running") >= 1, 60, "the backlog", cluster.logs[0]
        )
        (urgent,) = cluster.submit(["urgent"], max_new_tokens=8, priority="high")
        jobs = cluster.wait_final([*backlog, urgent], 120)
    assert all(job["status"] == "succeeded" for job in jobs), cluster.tail()
    order = start_order(cluster, [*backlog, urgent])
    rank = order.index(urgent)
    print(f"\nPRIORITY: the high job started {rank + 1} of 21; {20 - rank} low jobs after it")
    # It waits only for the slots already taken (2 running + 2 reserved), not the backlog.
    assert rank <= 4
    assert 20 - rank >= 15


def test_a_short_job_starts_before_a_backlog_of_long_jobs_of_its_priority_drains(
    postgres_url: str, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    """A web app's short job of normal priority skips the messages of long normal jobs
    sent before it: it goes to the express queue, which workers read first."""
    cluster = make_cluster(
        postgres_url, tmp_path, "fake:token_delay_s=0.02", GENQ_WORKER_CONCURRENCY="2"
    )
    backlog = cluster.submit([f"long job {i}" for i in range(20)], max_new_tokens=20)
    with cluster.worker():
        wait_until(
            lambda: cluster.count(backlog, "running") >= 1, 60, "the backlog", cluster.logs[0]
        )
        (short,) = cluster.submit(["short"], max_new_tokens=4)
        jobs = cluster.wait_final([*backlog, short], 120)
    assert all(job["status"] == "succeeded" for job in jobs), cluster.tail()
    rank = start_order(cluster, [*backlog, short]).index(short)
    print(f"\nEXPRESS: the short job started {rank + 1} of 21; {20 - rank} long jobs after it")
    assert rank <= 4  # only the slots already taken, not the backlog
    assert 20 - rank >= 15


def test_each_model_has_its_queue_and_its_workers(
    postgres_url: str, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    model_a, model_b = "fake:token_delay_s=0.001", "fake:max_prompt_words=500"
    cluster = make_cluster(postgres_url, tmp_path, model_a)
    env_b = {**cluster.env, "GENQ_MODEL": model_b}
    with cluster.worker(), cluster.worker(env=env_b):

        def both_served() -> bool:
            data = cluster.client.get("/v1/models").json()["data"]
            return len(data) == 2 and all(m["workers"] for m in data)

        wait_until(
            both_served,
            60,
            "both workers registered",
            cluster.logs[0],
        )
        models = {m["id"]: m["workers"] for m in cluster.client.get("/v1/models").json()["data"]}
        assert models == {model_a: 1, model_b: 1}
        on_a = cluster.submit(["to the default model"], max_new_tokens=3)
        on_b = cluster.submit(["to model b"], max_new_tokens=3, model=model_b)
        jobs = cluster.wait_final([*on_a, *on_b], 60)
        unknown = cluster.client.post("/v1/jobs", json={"prompt": "x", "model": "gpt-7"})
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], cluster.tail()
    assert jobs[0]["model"] == model_a and jobs[1]["model"] == model_b
    assert jobs[0]["worker"] != jobs[1]["worker"]
    assert unknown.status_code == 422
    message = unknown.json()["error"]["message"]
    assert model_a in message and model_b in message


def test_a_flood_of_short_jobs_holds_back_a_long_job_sent_before_it_only_so_far(
    postgres_url: str, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    """The express queue is read before ``normal``, and any caller may send short jobs of
    the default priority: an owner's flood of them must not hold back, for as long as it
    lasts, a long ``normal`` job sent before it. Past the owner's express burst its
    short jobs go to ``normal``, behind the long one (found by review: without the
    budget the long job started 31st of 31)."""
    cluster = make_cluster(
        postgres_url, tmp_path, "fake:token_delay_s=0.02", GENQ_WORKER_CONCURRENCY="2"
    )
    busy = cluster.submit([f"long job {i}" for i in range(4)], max_new_tokens=20)
    with cluster.worker():
        wait_until(lambda: cluster.count(busy, "running") >= 1, 60, "the workers", cluster.logs[0])
        (waiting,) = cluster.submit(["a long job sent first"], max_new_tokens=20)
        started = time.monotonic()
        flood = cluster.submit([f"short {i}" for i in range(30)], max_new_tokens=4)
        refilled = int(EXPRESS_RATE_PER_S * (time.monotonic() - started)) + 1
        jobs = cluster.wait_final([*busy, waiting, *flood], 120)
    assert all(job["status"] == "succeeded" for job in jobs), cluster.tail()
    rank = start_order(cluster, [waiting, *flood]).index(waiting)
    print(f"\nFLOOD: the long job sent first started {rank + 1} of 31")
    # At most the owner's express budget (its burst, plus what refilled while the flood
    # was sent) and the slots taken while it waited go first.
    assert rank <= EXPRESS_BURST + refilled + 4


def test_a_high_job_starts_at_once_while_a_batchs_messages_fill_the_worker(
    postgres_url: str, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    """Celery's prefetch counts a worker's messages whatever their queue: a backlog of
    messages of several jobs each fills it, and waits there for job slots. A few
    prefetch places, task threads and job slots are kept for the high and express
    queues, so a web app's job starts while the backlog's first jobs still run,
    instead of after them."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=FAULT_REDIS_URL,
        model="fake:token_delay_s=0.1",
        queue=unique_queue(),
        require_auth=False,
        jobs_per_message=2,  # 20 messages of 2 jobs
    )
    # 10 job slots (2 + 8) and 4 more for high and express; 14 task threads.
    cluster = Cluster(settings, tmp_path, GENQ_MAX_BATCH_SIZE="2")
    response = cluster.client.post(
        "/v1/jobs/bulk",
        json={
            "jobs": [
                {"prompt": f"bulk job {i}", "max_new_tokens": 10, "priority": "low"}
                for i in range(40)
            ]
        },
    )
    assert response.status_code == 202, response.text
    backlog = [job["id"] for job in response.json()["data"]]
    with cluster.worker():
        wait_until(
            lambda: cluster.count(backlog, "running") >= 1, 60, "the backlog", cluster.logs[0]
        )
        (urgent,) = cluster.submit(["urgent"], max_new_tokens=2, priority="high")
        jobs = {job["id"]: job for job in cluster.wait_final([*backlog, urgent], 120)}
    assert all(job["status"] == "succeeded" for job in jobs.values()), cluster.tail()
    first_done = min(jobs[i]["finished_at"] for i in backlog)
    # Each backlog job runs 1 s (10 words, 0.1 s each): the high job started before any
    # of them ended. (Without the kept places it waited for a backlog message to end.)
    assert jobs[urgent]["started_at"] < first_done, (jobs[urgent], first_done)
