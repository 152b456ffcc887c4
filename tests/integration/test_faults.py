"""Nothing is lost: fault tests against the real Redis and PostgreSQL, real workers.

Each test prints a line ``FAULT <name>: submitted N, completed N, lost N,
duplicated N`` (run pytest with -s to see them): completed counts jobs that
succeeded, lost counts jobs that never reached a final status in time, and
duplicated counts results stored more than once for one job (from the workers'
logs: every stored result is logged once with its job id).
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from core.queue import CeleryQueue, queue_name
from core.settings import Settings
from tests.integration.helpers import genq_env, genq_process, unique_queue, wait_until
from tests.tiny_model import tiny_model_dir

pytestmark = pytest.mark.integration

# A database of Redis's own, so FLUSHDB here touches nothing else.
FAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
FINAL = ("succeeded", "failed", "cancelled")
STORED = re.compile(r"job (job_[0-9a-f]+) \w+: result stored")


class Cluster:
    """An API (in-process) on a fresh PostgreSQL database and Redis, and workers."""

    def __init__(self, settings: Settings, tmp: Path, **worker_env: str) -> None:
        self.settings = settings
        self.tmp = tmp
        self.env = genq_env(
            GENQ_DATABASE_URL=settings.resolved_database_url,
            GENQ_BROKER_URL=settings.resolved_broker_url,
            GENQ_MODEL=settings.model,
            GENQ_QUEUE=settings.queue,
            GENQ_DATA_DIR=str(tmp),
            GENQ_LEASE_S="3",
            GENQ_SWEEP_INTERVAL_S="0.5",
            GENQ_REQUEUE_AFTER_S="2",
            GENQ_PROGRESS_INTERVAL_S="0.2",
            GENQ_SHUTDOWN_GRACE_S="1",
            GENQ_DB_RETRY_S="60",
            **worker_env,
        )
        self.logs: list[Path] = []
        self.client = TestClient(create_app(settings, queue=CeleryQueue(settings)))

    def worker(self, env: dict[str, str] | None = None) -> Any:
        log = self.tmp / f"worker{len(self.logs)}.log"
        self.logs.append(log)
        return genq_process(["worker", "--loglevel=INFO"], env or self.env, log)

    def submit(self, prompts: list[str], **params: Any) -> list[str]:
        ids = []
        for prompt in prompts:
            response = self.client.post("/v1/jobs", json={"prompt": prompt, **params})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        return ids

    def jobs(self, ids: list[str]) -> list[dict[str, Any]]:
        return [self.client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]

    def count(self, ids: list[str], status: str) -> int:
        listed = self.client.get("/v1/jobs", params={"status": status, "limit": 1000}).json()
        wanted = set(ids)
        return sum(job["id"] in wanted for job in listed["data"])

    def wait_final(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(ids)
            if all(job["status"] in FINAL for job in jobs):
                return jobs
            time.sleep(0.3)
        return self.jobs(ids)

    def stored_results(self) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for log in self.logs:
            counts.update(STORED.findall(log.read_text(errors="replace")))
        return counts

    def report(self, name: str, ids: list[str], jobs: list[dict[str, Any]]) -> dict[str, int]:
        stored = self.stored_results()
        figures = {
            "submitted": len(ids),
            "completed": sum(job["status"] == "succeeded" for job in jobs),
            "lost": sum(job["status"] not in FINAL for job in jobs),
            "duplicated": sum(stored[job_id] > 1 for job_id in ids),
        }
        print(f"\nFAULT {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
        return figures

    def tail(self) -> str:
        return "\n".join(log.read_text(errors="replace")[-2000:] for log in self.logs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def fault_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(FAULT_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def make_cluster(postgres_url: str, tmp: Path, model: str, **worker_env: str) -> Cluster:
    settings = Settings(
        data_dir=tmp,
        database_url=postgres_url,
        broker_url=FAULT_REDIS_URL,
        model=model,
        queue=unique_queue(),
        require_auth=False,
    )
    return Cluster(settings, tmp, **worker_env)


PROMPTS = ["Once upon a time", "The dog", "Lily saw a", "Tom and Sue went", "A big red ball"]


def prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(n)]


def test_worker_sigkilled_mid_run_then_a_new_worker_completes_every_job(
    postgres_url: str, tmp_path: Path, model_dir: Path, fault_redis: redis.Redis
) -> None:
    cluster = make_cluster(postgres_url, tmp_path, str(model_dir), GENQ_WORKER_CONCURRENCY="16")
    ids = cluster.submit(prompts(100), max_new_tokens=200)
    with cluster.worker() as first:
        # Kill while a run is in progress: a whole wave of jobs can finish at once, and
        # the gap before the next claim would make the kill hit nothing.
        wait_until(
            lambda: cluster.count(ids, "succeeded") >= 10 and cluster.count(ids, "running") > 0,
            120,
            "first results with more jobs running",
            cluster.logs[0],
        )
        first.send_signal(signal.SIGKILL)
        first.wait()
    running = cluster.count(ids, "running")
    done_before = cluster.count(ids, "succeeded")
    with cluster.worker():
        jobs = cluster.wait_final(ids, 180)
    figures = cluster.report("sigkill", ids, jobs)
    print(f"  (when killed: {done_before} succeeded, {running} running)")
    assert running > 0 and done_before < 100  # the kill did hit a run in progress
    assert figures["completed"] == 100, cluster.tail()
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert all(job["output"] for job in jobs)


def test_redis_emptied_mid_run_every_job_still_completes(
    postgres_url: str, tmp_path: Path, model_dir: Path, fault_redis: redis.Redis
) -> None:
    cluster = make_cluster(
        postgres_url, tmp_path, str(model_dir), GENQ_WORKER_CONCURRENCY="4",
        GENQ_MAX_BATCH_SIZE="4",
    )  # fmt: skip
    ids = cluster.submit(prompts(100), max_new_tokens=64)
    with cluster.worker():
        wait_until(
            lambda: cluster.count(ids, "succeeded") >= 5, 120, "first results", cluster.logs[0]
        )
        queue = queue_name(cluster.settings.queue, cluster.settings.model_id, "normal")
        lost_messages = fault_redis.llen(queue)
        fault_redis.flushdb()  # as a Redis restart without persistence would
        jobs = cluster.wait_final(ids, 180)
    figures = cluster.report("redis-flush", ids, jobs)
    print(f"  (messages dropped by the flush: {lost_messages})")
    assert lost_messages > 0
    assert figures["completed"] == 100, cluster.tail()
    assert figures["lost"] == 0 and figures["duplicated"] == 0


def test_postgres_restarted_mid_run_every_job_still_completes(
    postgres_url: str, tmp_path: Path, model_dir: Path, fault_redis: redis.Redis
) -> None:
    cluster = make_cluster(
        postgres_url, tmp_path, str(model_dir), GENQ_WORKER_CONCURRENCY="8",
        GENQ_MAX_BATCH_SIZE="8",
    )  # fmt: skip
    ids = cluster.submit(prompts(100), max_new_tokens=64)
    with cluster.worker():
        wait_until(
            lambda: cluster.count(ids, "succeeded") >= 5, 120, "first results", cluster.logs[0]
        )
        pending = 100 - cluster.count(ids, "succeeded")
        cluster_name = subprocess.run(
            ["ls", "/etc/postgresql"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", cluster_name, "main", "restart"],
            check=True, timeout=120,
        )  # fmt: skip
        jobs = cluster.wait_final(ids, 180)
    figures = cluster.report("postgres-restart", ids, jobs)
    print(f"  (jobs not yet done at the restart: {pending})")
    assert pending > 0
    assert figures["completed"] == 100, cluster.tail()
    assert figures["lost"] == 0 and figures["duplicated"] == 0


def test_a_job_that_always_crashes_its_worker_is_failed_after_n_attempts(
    postgres_url: str, tmp_path: Path, fault_redis: redis.Redis
) -> None:
    cluster = make_cluster(
        postgres_url, tmp_path, "fake:crash_on=POISON,token_delay_s=0.02",
        GENQ_MAX_ATTEMPTS="3",
    )  # fmt: skip
    ids = cluster.submit([*prompts(20)[:5], "POISON pill", *prompts(20)[5:]], max_new_tokens=20)
    poison = ids[5]
    deadline = time.monotonic() + 150
    restarts = 0
    while time.monotonic() < deadline:
        with cluster.worker() as proc:
            while proc.poll() is None and time.monotonic() < deadline:
                if all(job["status"] in FINAL for job in cluster.jobs(ids)):
                    break
                time.sleep(0.3)
            if proc.poll() is None:
                break
            restarts += 1
    jobs = cluster.jobs(ids)
    figures = cluster.report("poison", ids, jobs)
    print(f"  (worker restarts: {restarts})")
    by_id = {job["id"]: job for job in jobs}
    assert by_id[poison]["status"] == "failed", cluster.tail()
    assert by_id[poison]["error"]["code"] == "too_many_attempts"
    assert by_id[poison]["attempts"] == 3
    assert figures["completed"] == 20 and figures["lost"] == 0
    assert figures["duplicated"] == 0


def test_a_job_delivered_twice_is_generated_and_stored_once(
    postgres_url: str, tmp_path: Path, fault_redis: redis.Redis
) -> None:
    cluster = make_cluster(postgres_url, tmp_path, "fake:token_delay_s=0.05")
    ids = cluster.submit(["one two three"], max_new_tokens=20)
    queue = CeleryQueue(cluster.settings)
    for _ in range(3):
        queue.enqueue(ids[0])  # the same message, again and again
    with cluster.worker():
        jobs = cluster.wait_final(ids, 60)
        time.sleep(1.5)  # let the duplicates arrive and be skipped
    figures = cluster.report("duplicate-delivery", ids, jobs)
    assert jobs[0]["status"] == "succeeded" and jobs[0]["attempts"] == 1
    assert cluster.stored_results()[ids[0]] == 1
    assert figures["duplicated"] == 0


def test_sigterm_hands_running_jobs_back_and_another_worker_finishes_them(
    postgres_url: str, tmp_path: Path, fault_redis: redis.Redis
) -> None:
    cluster = make_cluster(postgres_url, tmp_path, "fake:token_delay_s=0.05")
    ids = cluster.submit(prompts(6), max_new_tokens=200)  # 10 s each: longer than the grace
    with cluster.worker() as first:
        wait_until(lambda: cluster.count(ids, "running") == 6, 60, "jobs running", cluster.logs[0])
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
        handed_back = cluster.count(ids, "queued")
    with cluster.worker():
        jobs = cluster.wait_final(ids, 90)
    figures = cluster.report("sigterm", ids, jobs)
    assert handed_back == 6, cluster.tail()
    assert figures["completed"] == 6 and figures["duplicated"] == 0
    assert all(job["attempts"] == 1 for job in jobs)
