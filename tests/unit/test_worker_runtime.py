"""The worker runtime against SQLite and PostgreSQL, with the fake engine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core import delivery
from core.db import session_scope
from core.models import Job, utcnow
from core.settings import Settings
from tests.conftest import RecordingQueue, submit_prompt
from worker.engine.fake import FakeEngine
from worker.runtime import WorkerRuntime


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"progress_interval_s": 0.05})


@pytest.fixture
def runtime(fast_settings: Settings) -> Iterator[WorkerRuntime]:
    rt = WorkerRuntime(fast_settings, FakeEngine(max_prompt_words=20, token_delay_s=0.0))
    yield rt
    rt.close()


def test_a_job_is_claimed_generated_and_stored(client: TestClient, runtime: WorkerRuntime) -> None:
    job_id = submit_prompt(client, max_new_tokens=4)
    assert runtime.run_job(job_id, worker="w1") == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["output"] == " three two one three"
    assert job["outputs"] == [job["output"]]
    assert job["finish_reason"] == "length"
    assert job["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    assert job["attempts"] == 1
    assert job["worker"] == "w1"
    assert job["started_at"] is not None and job["finished_at"] is not None
    assert job["reproducibility"]["model_revision"] == "fake"
    assert job["reproducibility"]["torch_version"] == "none"


def test_a_job_cancelled_before_it_starts_is_not_generated(
    client: TestClient, runtime: WorkerRuntime
) -> None:
    job_id = submit_prompt(client)
    client.post(f"/v1/jobs/{job_id}/cancel")
    assert runtime.run_job(job_id, worker="w1") == "skipped"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["output"] is None and job["attempts"] == 0


def test_a_failure_is_stored_with_its_error_code(
    client: TestClient, runtime: WorkerRuntime
) -> None:
    job_id = submit_prompt(client, prompt=" ".join(["word"] * 50))
    assert runtime.run_job(job_id, worker="w1") == "failed"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "prompt_too_long"
    assert job["output"] is None


def test_a_duplicate_delivery_does_not_generate_twice(
    client: TestClient, runtime: WorkerRuntime
) -> None:
    job_id = submit_prompt(client, max_new_tokens=2)
    assert runtime.run_job(job_id, worker="w1") == "succeeded"
    assert runtime.run_job(job_id, worker="w2") == "skipped"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["attempts"] == 1 and job["worker"] == "w1"


def test_a_stale_claim_cannot_overwrite_a_result(client: TestClient, settings: Settings) -> None:
    job_id = submit_prompt(client)
    url = settings.resolved_database_url
    with session_scope(url) as session:
        stale = delivery.claim_job(session, job_id, worker="old", lease_s=60, max_attempts=3)
    assert stale is not None
    # The attempt is handed back and claimed again by another worker.
    with session_scope(url) as session:
        requeued, _ = delivery.reclaim_expired(session, max_attempts=3)
        assert requeued == []
        session.get(Job, job_id).lease_expires_at = utcnow() - dt.timedelta(seconds=1)
    with session_scope(url) as session:
        routes, failed = delivery.reclaim_expired(session, max_attempts=3)
        assert [r.job_id for r in routes] == [job_id] and failed == []
    with session_scope(url) as session:
        fresh = delivery.claim_job(session, job_id, worker="new", lease_s=60, max_attempts=3)
    assert fresh is not None and fresh.attempt == stale.attempt + 1
    outcome = delivery.Outcome(["stale"], ["length"], 1, 1, "r", "t", "tf")
    with session_scope(url) as session:
        assert delivery.finish_job(session, stale, outcome) is False
        assert delivery.fail_job(session, stale, code="x", message="y") is False
    with session_scope(url) as session:
        assert (
            delivery.finish_job(session, fresh, dataclasses.replace(outcome, outputs=["fresh"]))
            is True
        )
    assert client.get(f"/v1/jobs/{job_id}").json()["output"] == "fresh"


def test_progress_is_visible_and_a_running_job_can_be_cancelled_keeping_its_output(
    client: TestClient, fast_settings: Settings
) -> None:
    runtime = WorkerRuntime(fast_settings, FakeEngine(token_delay_s=0.02))
    try:
        job_id = submit_prompt(client, max_new_tokens=1000)
        outcome: dict[str, str] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(status=runtime.run_job(job_id, worker="w1"))
        )
        thread.start()
        job = _wait_for(client, job_id, lambda j: (j["usage"]["completion_tokens"] or 0) >= 5)
        assert job["status"] == "running"
        assert job["output"].startswith(" three two one")
        client.post(f"/v1/jobs/{job_id}/cancel")
        thread.join(timeout=10)
        assert outcome["status"] == "cancelled"
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled"
        assert 5 <= job["usage"]["completion_tokens"] < 1000
        assert len(job["output"].split()) == job["usage"]["completion_tokens"]
    finally:
        runtime.close()


def _wait_for(client: TestClient, job_id: str, ready: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if ready(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never got there: {job}")


def test_a_job_delivered_twice_concurrently_produces_one_result(
    client: TestClient, fast_settings: Settings
) -> None:
    engines = [FakeEngine(token_delay_s=0.01), FakeEngine(token_delay_s=0.01)]
    runtimes = [WorkerRuntime(fast_settings, engine) for engine in engines]
    try:
        job_id = submit_prompt(client, max_new_tokens=10)
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def deliver(runtime: WorkerRuntime, name: str) -> None:
            barrier.wait()
            outcomes.append(runtime.run_job(job_id, worker=name))

        threads = [
            threading.Thread(target=deliver, args=(rt, f"w{i}")) for i, rt in enumerate(runtimes)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert sorted(outcomes) == ["skipped", "succeeded"]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 1
    finally:
        for runtime in runtimes:
            runtime.close()


def test_a_running_job_handed_back_on_shutdown_is_queued_again_without_an_attempt(
    client: TestClient, fast_settings: Settings, queue: RecordingQueue
) -> None:
    runtime = WorkerRuntime(fast_settings, FakeEngine(token_delay_s=0.02), queue)
    try:
        job_id = submit_prompt(client, max_new_tokens=1000)
        outcome: dict[str, str] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(status=runtime.run_job(job_id, worker="w1"))
        )
        thread.start()
        _wait_for(client, job_id, lambda j: j["status"] == "running")
        runtime.drain(grace_s=0.1)
        thread.join(timeout=10)
        assert outcome["status"] == "handed_back"
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued" and job["attempts"] == 0 and job["output"] is None
        assert queue.sent.count(job_id) == 2  # submitted, then re-sent
    finally:
        runtime.close()
