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
from sqlalchemy.exc import OperationalError

from core import jobstate
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
    assert job["reproducibility"]["dtype"] == "none"  # the fake engine has no weights
    assert job["reproducibility"]["products"] == "none"


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
        stale = jobstate.claim_job(session, job_id, worker="old", lease_s=60, max_attempts=3)
    assert stale is not None
    # The attempt is handed back and claimed again by another worker.
    with session_scope(url) as session:
        requeued, _ = jobstate.reclaim_expired(session, max_attempts=3)
        assert requeued == []
        session.get(Job, job_id).lease_expires_at = utcnow() - dt.timedelta(seconds=1)
    with session_scope(url) as session:
        routes, failed = jobstate.reclaim_expired(session, max_attempts=3)
        assert [r.job_id for r in routes] == [job_id] and failed == []
    with session_scope(url) as session:
        fresh = jobstate.claim_job(session, job_id, worker="new", lease_s=60, max_attempts=3)
    assert fresh is not None and fresh.attempt == stale.attempt + 1
    outcome = jobstate.Outcome(["stale"], ["length"], 1, 1, "r", "t", "tf")
    with session_scope(url) as session:
        assert jobstate.store_outcomes(session, [(stale, outcome)]) == [False]
        assert jobstate.store_outcomes(session, [(stale, jobstate.Failure("x", "y"))]) == [False]
    with session_scope(url) as session:
        assert jobstate.store_outcomes(
            session, [(fresh, dataclasses.replace(outcome, outputs=["fresh"]))]
        ) == [True]
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
        assert job["usage"]["prompt_tokens"] == 3  # known while it runs (issue 14)
        client.post(f"/v1/jobs/{job_id}/cancel")
        thread.join(timeout=10)
        assert outcome["status"] == "cancelled"
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled"
        assert 5 <= job["usage"]["completion_tokens"] < 1000
        assert len(job["output"].split()) == job["usage"]["completion_tokens"]
        assert job["finish_reason"] == "cancelled"  # not "length" (issue 14)
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
        # Not re-sent from the stopping worker: its task rejects the message with
        # requeue (test_worker_shutdown.py), so the broker delivers it again.
        assert queue.sent.count(job_id) == 1
    finally:
        runtime.close()


def _bulk_ids(client: TestClient, prompts: list[str], **body: Any) -> list[str]:
    response = client.post("/v1/jobs/bulk", json={"jobs": [{"prompt": p, **body} for p in prompts]})
    assert response.status_code == 202, response.text
    return [job["id"] for job in response.json()["data"]]


def test_the_jobs_of_one_message_run_together_each_getting_its_own_result(
    client: TestClient, runtime: WorkerRuntime, settings: Settings
) -> None:
    prompts = ["one two three", "alpha beta", "x y z w", "cancel me", "retried one"]
    ids = _bulk_ids(client, prompts, max_new_tokens=3)
    alone = [submit_prompt(client, p, max_new_tokens=3) for p in prompts]
    client.post(f"/v1/jobs/{ids[3]}/cancel")
    with session_scope(settings.resolved_database_url) as session:
        session.get(Job, ids[4]).attempts = 1  # its worker died once: a suspect, run alone
    statuses = runtime.run_jobs([*ids, "job_unknown"], worker="w1")
    assert statuses == {
        ids[0]: "succeeded",
        ids[1]: "succeeded",
        ids[2]: "succeeded",
        ids[3]: "skipped",
        ids[4]: "succeeded",
        "job_unknown": "skipped",
    }
    for job_id, alone_id in zip(ids, alone, strict=True):
        runtime.run_job(alone_id, worker="w1")
        job, reference = (client.get(f"/v1/jobs/{i}").json() for i in (job_id, alone_id))
        if job_id == ids[3]:
            assert job["status"] == "cancelled" and job["output"] is None
            continue
        assert job["output"] == reference["output"] and job["usage"] == reference["usage"]
    assert client.get(f"/v1/jobs/{ids[4]}").json()["attempts"] == 2
    assert runtime.run_jobs(ids, worker="w2") == dict.fromkeys(ids, "skipped")  # redelivered


def test_progress_of_jobs_claimed_together_goes_to_each_job(
    client: TestClient, fast_settings: Settings
) -> None:
    runtime = WorkerRuntime(fast_settings, FakeEngine(token_delay_s=0.02))
    try:
        ids = _bulk_ids(client, ["one two three", "alpha beta"], max_new_tokens=1000)
        thread = threading.Thread(target=runtime.run_jobs, args=(ids,), kwargs={"worker": "w1"})
        thread.start()
        ready = lambda j: (j["usage"]["completion_tokens"] or 0) >= 3  # noqa: E731
        first, second = (_wait_for(client, job_id, ready) for job_id in ids)
        assert first["output"].startswith(" three two one")
        assert second["output"].startswith(" beta alpha beta")
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")
        thread.join(timeout=10)
    finally:
        runtime.close()


def test_a_worker_claims_no_more_jobs_than_its_slots_the_rest_stay_queued(
    client: TestClient, fast_settings: Settings
) -> None:
    settings = fast_settings.model_copy(update={"worker_concurrency": 2})
    runtime = WorkerRuntime(settings, FakeEngine(token_delay_s=0.02))
    try:
        first, second = (_bulk_ids(client, ["a b", "c d"], max_new_tokens=1000) for _ in range(2))
        threads = [
            threading.Thread(target=runtime.run_jobs, args=(ids,), kwargs={"worker": "w1"})
            for ids in (first, second)
        ]
        threads[0].start()
        for job_id in first:
            _wait_for(client, job_id, lambda j: j["status"] == "running")
        threads[1].start()
        time.sleep(0.3)
        assert {client.get(f"/v1/jobs/{i}").json()["status"] for i in second} == {"queued"}
        for job_id in first:
            client.post(f"/v1/jobs/{job_id}/cancel")
        for job_id in second:  # the first message's slots are free again
            _wait_for(client, job_id, lambda j: j["status"] == "running")
            client.post(f"/v1/jobs/{job_id}/cancel")
        for thread in threads:
            thread.join(timeout=10)
    finally:
        runtime.close()


def test_a_done_job_gives_its_slot_back_before_the_rest_of_its_message_ends(
    client: TestClient, fast_settings: Settings
) -> None:
    """A message's short job, once stored, frees its slot for the next message while
    its long job still runs: slots are not kept idle behind a message's longest job."""
    settings = fast_settings.model_copy(update={"worker_concurrency": 2})
    runtime = WorkerRuntime(settings, FakeEngine(token_delay_s=0.02))
    try:
        jobs = [{"prompt": "a b", "max_new_tokens": 2}, {"prompt": "c d", "max_new_tokens": 1000}]
        response = client.post("/v1/jobs/bulk", json={"jobs": jobs})
        short, long = (job["id"] for job in response.json()["data"])
        (later,) = _bulk_ids(client, ["e f"], max_new_tokens=1000)
        threads = [
            threading.Thread(target=runtime.run_jobs, args=(ids,), kwargs={"worker": "w1"})
            for ids in ([short, long], [later])
        ]
        threads[0].start()
        _wait_for(client, long, lambda j: j["status"] == "running")
        threads[1].start()
        _wait_for(client, short, lambda j: j["status"] == "succeeded")
        _wait_for(client, later, lambda j: j["status"] == "running")
        assert client.get(f"/v1/jobs/{long}").json()["status"] == "running"
        for job_id in (long, later):
            client.post(f"/v1/jobs/{job_id}/cancel")
        for thread in threads:
            thread.join(timeout=10)
        assert runtime._slots._used == 0  # every slot given back once
    finally:
        runtime.close()


def test_a_message_larger_than_the_slots_lets_no_other_in_while_its_running_jobs_fill_them(
    client: TestClient, fast_settings: Settings
) -> None:
    """Four jobs in a message, two slots: once its two short jobs are stored, its two
    long ones still fill the slots, and the next message waits (freeing a slot per job
    done must not count slots it never had)."""
    settings = fast_settings.model_copy(update={"worker_concurrency": 2})
    runtime = WorkerRuntime(settings, FakeEngine(token_delay_s=0.02))
    try:
        short, long = (
            {"prompt": "a b", "max_new_tokens": 2},
            {"prompt": "c d", "max_new_tokens": 1000},
        )
        response = client.post("/v1/jobs/bulk", json={"jobs": [short, short, long, long]})
        first = [job["id"] for job in response.json()["data"]]
        second = _bulk_ids(client, ["e f"], max_new_tokens=1000)
        threads = [
            threading.Thread(target=runtime.run_jobs, args=(ids,), kwargs={"worker": "w1"})
            for ids in (first, second)
        ]
        threads[0].start()
        for job_id in first[:2]:
            _wait_for(client, job_id, lambda j: j["status"] == "succeeded")
        threads[1].start()
        time.sleep(0.3)
        assert client.get(f"/v1/jobs/{second[0]}").json()["status"] == "queued"
        for job_id in first[2:]:
            client.post(f"/v1/jobs/{job_id}/cancel")
        _wait_for(client, second[0], lambda j: j["status"] == "running")
        client.post(f"/v1/jobs/{second[0]}/cancel")
        for thread in threads:
            thread.join(timeout=10)
        assert runtime._slots._used == 0
    finally:
        runtime.close()


def test_results_that_cannot_be_stored_leave_their_jobs_for_the_sweeper(
    client: TestClient, fast_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No background monitor pass (it could renew a lease just before the release):
    # the test runs the monitor itself.
    settings = fast_settings.model_copy(update={"db_retry_s": 0, "progress_interval_s": 3600})
    runtime = WorkerRuntime(settings, FakeEngine(token_delay_s=0.01))
    try:
        response = client.post(
            "/v1/jobs/bulk",
            json={"jobs": [{"prompt": "quick", "max_new_tokens": 1}, {"prompt": "slow one"}]},
        )
        ids = [job["id"] for job in response.json()["data"]]

        def database_down(*_: Any, **__: Any) -> None:
            raise OperationalError("UPDATE job", {}, Exception("database down"))

        monkeypatch.setattr(jobstate, "store_outcomes", database_down)
        with pytest.raises(OperationalError):  # storing the quick one fails
            runtime.run_jobs(ids, worker="w1")
        monkeypatch.undo()
        url = settings.resolved_database_url
        with session_scope(url) as session:
            leases = {i: session.get(Job, i).lease_expires_at for i in ids}
        runtime.monitor_once()  # no lease of the group is renewed any more
        with session_scope(url) as session:
            for job_id in ids:
                job = session.get(Job, job_id)
                assert job.status == "running" and job.lease_expires_at == leases[job_id]
                job.lease_expires_at = utcnow() - dt.timedelta(seconds=1)
        with session_scope(url) as session:
            routes, _ = jobstate.reclaim_expired(session, max_attempts=3)
        assert sorted(r.job_id for r in routes) == sorted(ids)
    finally:
        runtime.close()


class _RequeueingEngine(FakeEngine):
    """An engine that cannot place any request (as when memory runs out even alone)."""

    def submit(self, request: Any) -> Any:
        from concurrent.futures import Future

        from worker.engine.base import REQUEUE, GenerationError

        future: Future[Any] = Future()
        future.set_exception(GenerationError(REQUEUE, "out of memory even alone"))
        return future


def test_a_job_the_engine_cannot_place_goes_back_to_the_queue_not_to_failed(
    client: TestClient, fast_settings: Settings, queue: RecordingQueue
) -> None:
    runtime = WorkerRuntime(fast_settings, _RequeueingEngine(), queue)
    try:
        job_id = submit_prompt(client, max_new_tokens=3)
        assert runtime.run_job(job_id, worker="w1") == "handed_back"
        job = client.get(f"/v1/jobs/{job_id}").json()
        # Queued again, no failure stored; its message goes back through the task.
        assert job["status"] == "queued" and job["error"] is None and job["attempts"] == 1
        # Each time it uses an attempt, so it cannot come back forever.
        for _ in range(fast_settings.max_attempts + 1):
            runtime.run_job(job_id, worker="w1")
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "too_many_attempts"
        assert job["attempts"] <= fast_settings.max_attempts
    finally:
        runtime.close()


class _MortalEngine(FakeEngine):
    """A fake engine whose scheduler can die: health turns false and every request
    in flight fails with engine_failed, as BatchingEngine does."""

    def __init__(self) -> None:
        super().__init__(token_delay_s=0.0)
        self.alive = True
        self.pending: list[Any] = []

    def submit(self, request: Any) -> Any:
        from concurrent.futures import Future

        future: Future[Any] = Future()
        self.pending.append(future)
        return future

    def check_health(self) -> bool:
        return self.alive

    def die(self) -> None:
        from worker.engine.base import GenerationError

        self.alive = False
        for future in self.pending:
            future.set_exception(GenerationError("engine_failed", "the scheduler died"))


def test_a_dead_engine_hands_back_its_jobs_leaves_the_registry_and_stops_the_worker(
    client: TestClient, fast_settings: Settings, queue: RecordingQueue
) -> None:
    from core.workers import live_workers
    from worker.runtime import DrainingError

    engine = _MortalEngine()
    runtime = WorkerRuntime(fast_settings, engine, queue, name="mortal")
    exited = threading.Event()
    runtime.on_engine_dead = exited.set
    try:
        runtime.heartbeat()
        job_id = submit_prompt(client, max_new_tokens=3)
        outcome: dict[str, str] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(status=runtime.run_job(job_id, worker="w1"))
        )
        thread.start()
        _wait_for(client, job_id, lambda j: j["status"] == "running")
        engine.die()
        thread.join(timeout=10)
        assert outcome["status"] == "handed_back"
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued" and job["error"] is None and job["attempts"] == 0
        assert exited.wait(timeout=10)  # the lifecycle exits non-zero here
        with session_scope(fast_settings.resolved_database_url) as session:
            assert "mortal" not in [w.name for w in live_workers(session, within_s=3600)]
        with pytest.raises(DrainingError):  # the next message goes back to the broker
            runtime.run_job(submit_prompt(client), worker="w1")
    finally:
        runtime.close()


def test_jobs_past_the_time_limit_fail_with_timeout_whether_running_or_waiting(
    client: TestClient, fast_settings: Settings
) -> None:
    # One engine slot: the first job runs (slowly), the second waits behind it. At
    # the limit both are aborted; an aborted request resolves as a short result,
    # which must be stored as a timeout, never as a success.
    settings = fast_settings.model_copy(update={"task_time_limit_s": 1})
    runtime = WorkerRuntime(settings, FakeEngine(token_delay_s=0.02, max_workers=1))
    try:
        response = client.post(
            "/v1/jobs/bulk",
            json={"jobs": [{"prompt": "runs", "max_new_tokens": 1000}, {"prompt": "waits"}]},
        )
        ids = [job["id"] for job in response.json()["data"]]
        statuses = runtime.run_jobs(ids, worker="w1")
        assert statuses == dict.fromkeys(ids, "failed")
        for job_id in ids:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "failed", job
            assert job["error"]["code"] == "timeout"
    finally:
        runtime.close()
