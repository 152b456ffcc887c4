"""A worker shutting down starts nothing new and hands what runs back, uncounted."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery.exceptions import Reject
from fastapi.testclient import TestClient

from core.settings import Settings
from tests.conftest import RecordingQueue, submit_prompt
from worker import lifecycle, tasks
from worker.engine.fake import FakeEngine
from worker.runtime import HANDED_BACK, DrainingError, WorkerRuntime


def _until(check: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout  # an upper bound to give up, not a timing assertion
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_message_waiting_for_a_slot_when_the_worker_drains_does_not_start(
    client: TestClient, settings: Settings, queue: RecordingQueue
) -> None:
    one_slot = settings.model_copy(update={"worker_concurrency": 1, "progress_interval_s": 0.05})
    runtime = WorkerRuntime(one_slot, FakeEngine(token_delay_s=0.02), queue)
    try:
        running = submit_prompt(client, "a b", max_new_tokens=1000)
        waiting = submit_prompt(client, "c d", max_new_tokens=1000)
        outcomes: dict[str, Any] = {}

        def deliver(job_id: str) -> None:
            try:
                outcomes[job_id] = runtime.run_job(job_id, worker="w1")
            except DrainingError as exc:
                outcomes[job_id] = exc

        threads = [threading.Thread(target=deliver, args=(running,))]
        threads[0].start()
        _until(lambda: client.get(f"/v1/jobs/{running}").json()["status"] == "running", "run")
        threads.append(threading.Thread(target=deliver, args=(waiting,)))
        threads[1].start()
        _until(lambda: runtime._slots.waiting == 1, "the second message waits for the slot")
        runtime.drain(grace_s=0)
        for thread in threads:
            thread.join(timeout=10)
        assert outcomes[running] == "handed_back"
        assert isinstance(outcomes[waiting], DrainingError)  # its message goes back
        for job_id in (running, waiting):
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "queued" and job["attempts"] == 0, job
            assert job["started_at"] is None
    finally:
        runtime.close()


class _Request:
    hostname = "w1"
    delivery_info = {"routing_key": "genq.gpt2-0123abcd.normal"}


class _Task:
    request = _Request()


class _Runtime:
    """Stands in for the worker's runtime: answers each job with a given status."""

    def __init__(self, status: str) -> None:
        self.status = status

    def run_jobs(self, job_ids: list[str], *, worker: str, queue: str | None) -> dict[str, str]:
        return dict.fromkeys(job_ids, self.status)


@pytest.mark.parametrize("status", [HANDED_BACK, "succeeded"])
def test_a_message_whose_jobs_were_handed_back_goes_back_to_the_broker(
    monkeypatch: pytest.MonkeyPatch, status: str
) -> None:
    monkeypatch.setattr(lifecycle, "get_runtime", lambda: _Runtime(status))
    if status == HANDED_BACK:
        with pytest.raises(Reject) as rejected:
            tasks._run(_Task(), ["job_1", "job_2"])
        assert rejected.value.requeue is True
    else:
        assert tasks._run(_Task(), ["job_1"]) == {"job_1": "succeeded"}
