"""/metrics: cluster-wide figures from SQL, on SQLite and PostgreSQL, parsed as Prometheus does."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator, Sequence

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy.orm import Session

from api.app import create_app
from core.db import session_scope
from core.models import Job, WorkerNode, utcnow
from core.queue import Route, queue_name, queues_for
from core.settings import Settings

_ids = itertools.count()


class DepthQueue:
    """A queue whose depths are given, recording which queues were asked."""

    def __init__(self, depths: dict[str, int], *, down: bool = False) -> None:
        self.depths = depths
        self.asked: list[str] = []
        self.down = down

    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        pass

    def enqueue_many(self, routes: Sequence[Route]) -> None:
        pass

    def ping(self) -> None:
        pass

    def depth(self, queue: str) -> int:
        if self.down:
            raise ConnectionError("broker down")
        self.asked.append(queue)
        return self.depths.get(queue, 0)

    def queued_jobs(self, queue: str) -> int:
        return self.depth(queue)


def add_job(
    session: Session,
    *,
    status: str,
    model: str = "fake",
    priority: str = "normal",
    created_ago: float = 0.0,
    wait_s: float | None = None,
    run_s: float | None = None,
    finished_ago: float | None = None,
    tokens: int | None = None,
) -> None:
    """A job row whose timestamps are set relative to now, backwards from its finish."""
    now = utcnow()
    finished = now - dt.timedelta(seconds=finished_ago) if finished_ago is not None else None
    started = created = now - dt.timedelta(seconds=created_ago)
    if finished is not None:
        started = finished - dt.timedelta(seconds=run_s or 0.0)
        created = started - dt.timedelta(seconds=wait_s or 0.0)
    job = Job(
        id=f"job_{next(_ids):08d}",
        status=status,
        prompt="p",
        model=model,
        params={},
        owner="local",
        priority=priority,
        attempts=0,
        created_at=created,
        started_at=started if run_s is not None else None,
        finished_at=finished,
        completion_tokens=tokens,
    )
    session.add(job)


def add_worker(
    session: Session, name: str, model: str, *, seen_ago: float, tokens: int, in_flight: int = 0
) -> None:
    session.add(
        WorkerNode(
            name=name,
            model=model,
            queues=queues_for("genq", model),
            started_at=utcnow() - dt.timedelta(hours=2),
            last_seen=utcnow() - dt.timedelta(seconds=seen_ago),
            in_flight=in_flight,
            tokens_generated=tokens,
        )
    )


@pytest.fixture
def populated(settings: Settings) -> Settings:
    with session_scope(settings.resolved_database_url) as s:
        add_job(s, status="queued", priority="high", created_ago=100)
        add_job(s, status="queued", created_ago=5)
        add_job(s, status="running", created_ago=3, run_s=1)
        # Finished 5 s ago: in the histograms' window and in the last minute's tokens.
        add_job(s, status="succeeded", wait_s=0.3, run_s=0.2, finished_ago=5, tokens=10)
        add_job(s, status="succeeded", wait_s=2, run_s=1.5, finished_ago=5, tokens=20)
        add_job(s, status="succeeded", wait_s=20, run_s=40, finished_ago=5, tokens=30)
        # Finished two hours ago: counted by status only.
        add_job(s, status="failed", wait_s=1, run_s=1, finished_ago=7200, tokens=100)
        # Another model: one in the histogram window but not the last minute, one
        # cancelled before it started (no run time, no wait).
        add_job(s, status="succeeded", model="other", wait_s=3, run_s=4, finished_ago=600, tokens=7)
        add_job(s, status="cancelled", model="other", finished_ago=30)
        add_worker(s, "w1", "fake", seen_ago=1, tokens=500, in_flight=1)
        add_worker(s, "w2", "fake", seen_ago=2, tokens=250)
        add_worker(s, "w3", "gone", seen_ago=3600, tokens=9999, in_flight=4)  # stale
        add_worker(s, "w4", "other", seen_ago=0, tokens=7)
    return settings


def scrape(client: TestClient) -> dict[str, list[Sample]]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def values(samples: list[Sample], label: str, suffix: str = "") -> dict[str, float]:
    return {s.labels[label]: s.value for s in samples if s.name.endswith(suffix)}


def buckets(samples: list[Sample], model: str) -> dict[str, float]:
    return {
        s.labels["le"]: s.value
        for s in samples
        if s.name.endswith("_bucket") and s.labels["model"] == model
    }


def one(samples: list[Sample], suffix: str, model: str) -> float:
    (value,) = (s.value for s in samples if s.name.endswith(suffix) and s.labels["model"] == model)
    return value


@pytest.fixture
def depth_queue() -> DepthQueue:
    return DepthQueue(
        {queue_name("genq", "fake", "high"): 1, queue_name("genq", "fake", "normal"): 4}
    )


@pytest.fixture
def metrics_client(populated: Settings, depth_queue: DepthQueue) -> Iterator[TestClient]:
    with TestClient(create_app(populated, queue=depth_queue)) as client:
        yield client


def test_jobs_workers_and_tokens(metrics_client: TestClient) -> None:
    families = scrape(metrics_client)
    jobs = {(s.labels["status"], s.labels["model"]): s.value for s in families["genq_jobs"]}
    assert jobs == {
        ("queued", "fake"): 2,
        ("running", "fake"): 1,
        ("succeeded", "fake"): 3,
        ("failed", "fake"): 1,
        ("succeeded", "other"): 1,
        ("cancelled", "other"): 1,
    }
    assert values(families["genq_workers_alive"], "model") == {"fake": 2, "other": 1}
    assert values(families["genq_worker_jobs_in_flight"], "model") == {"fake": 1, "other": 0}
    assert values(families["genq_tokens_generated"], "model", "_total") == {
        "fake": 750,
        "other": 7,
    }
    # 10 + 20 + 30 tokens finished in the last minute; the others earlier.
    (rate,) = families["genq_generation_tokens_per_second"]
    assert rate.value == pytest.approx(60 / 60)
    assert values(families["genq_oldest_queued_job_age_seconds"], "model")["fake"] >= 100


def test_sliding_window_histograms(metrics_client: TestClient) -> None:
    families = scrape(metrics_client)
    run = families["genq_job_run_seconds"]
    assert buckets(run, "fake") == {
        "0.1": 0, "0.25": 1, "0.5": 1, "1.0": 1, "2.5": 2, "5.0": 2, "10.0": 2, "30.0": 2,
        "60.0": 3, "120.0": 3, "300.0": 3, "600.0": 3, "1800.0": 3, "3600.0": 3, "+Inf": 3,
    }  # fmt: skip
    assert one(run, "_count", "fake") == 3
    assert one(run, "_sum", "fake") == pytest.approx(41.7, abs=0.01)
    assert buckets(run, "other")["5.0"] == 1 and buckets(run, "other")["2.5"] == 0
    assert one(run, "_count", "other") == 1  # the cancelled one never started

    wait = families["genq_job_queue_wait_seconds"]
    waits = buckets(wait, "fake")
    assert (waits["0.25"], waits["0.5"], waits["2.5"], waits["10.0"], waits["30.0"]) == (
        0, 1, 2, 2, 3
    )  # fmt: skip
    assert one(wait, "_sum", "fake") == pytest.approx(22.3, abs=0.01)


def test_queue_depths_of_live_workers_and_queued_jobs(
    metrics_client: TestClient, depth_queue: DepthQueue
) -> None:
    families = scrape(metrics_client)
    depths = values(families["genq_queue_depth"], "queue")
    assert depths == {
        **dict.fromkeys(queues_for("genq", "fake") + queues_for("genq", "other"), 0),
        queue_name("genq", "fake", "high"): 1,
        queue_name("genq", "fake", "normal"): 4,
    }
    assert not any("gone" in q for q in depth_queue.asked)  # the stale worker's queues
    (up,) = families["genq_broker_up"]
    assert up.value == 1


def test_every_api_process_reports_the_same_figures(
    populated: Settings, metrics_client: TestClient
) -> None:
    with TestClient(create_app(populated, queue=DepthQueue({}))) as other:
        assert scrape(other)["genq_jobs"] == scrape(metrics_client)["genq_jobs"]


def test_a_broker_outage_keeps_the_sql_figures(populated: Settings) -> None:
    with TestClient(create_app(populated, queue=DepthQueue({}, down=True))) as client:
        families = scrape(client)
    (up,) = families["genq_broker_up"]
    assert up.value == 0
    assert values(families["genq_workers_alive"], "model") == {"fake": 2, "other": 1}


def test_an_empty_database_scrapes_cleanly_and_metrics_need_no_key(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"require_auth": True}), queue=DepthQueue({}))
    with TestClient(app) as client:
        assert client.get("/v1/jobs").status_code == 401
        families = scrape(client)
    (rate,) = families["genq_generation_tokens_per_second"]
    assert rate.value == 0
    assert families["genq_jobs"] == []
