"""Short jobs of normal priority go to their model's express queue, which workers read
right after ``high``: a web app's short job does not wait behind long jobs' messages."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core import express
from core.express import EXPRESS_BURST, sends_express
from core.queue import queue_name, queues_for
from core.quotas import RateLimiter
from core.settings import Settings
from tests.conftest import RecordingQueue


def lane_of(client: TestClient, queue: RecordingQueue, **body: Any) -> str:
    response = client.post("/v1/jobs", json={"prompt": "Once upon a time", **body})
    assert response.status_code == 202, response.text
    job_id, model, lane = queue.routes[-1]
    assert job_id == response.json()["id"] and model == "fake"
    return lane


def test_workers_read_high_then_express_then_normal_then_low() -> None:
    assert queues_for("genq", "fake") == [
        queue_name("genq", "fake", lane) for lane in ("high", "express", "normal", "low")
    ]


def test_short_normal_jobs_go_express_and_the_others_keep_their_priority(
    client: TestClient, queue: RecordingQueue
) -> None:
    assert lane_of(client, queue, max_new_tokens=4) == "express"
    assert lane_of(client, queue) == "express"  # the tests' default length: 16
    four = {"do_sample": True, "num_return_sequences": 4}
    assert lane_of(client, queue, max_new_tokens=16, **four) == "express"
    # Long, wide or heavy: the normal queue.
    assert lane_of(client, queue, max_new_tokens=17) == "normal"
    assert lane_of(client, queue, max_length=10) == "normal"  # new tokens not known
    assert lane_of(client, queue, max_new_tokens=4, num_beams=5) == "normal"
    assert lane_of(client, queue, prompt="word " * 120, max_new_tokens=4) == "normal"
    assert lane_of(client, queue, max_new_tokens=16, prompt="x" * 120, **four) == "normal"
    # Other priorities keep their queues: high is read first anyway, low is bulk work.
    assert lane_of(client, queue, max_new_tokens=4, priority="high") == "high"
    assert lane_of(client, queue, max_new_tokens=4, priority="low") == "low"


def test_a_bulk_submit_sends_each_job_to_its_lane(
    client: TestClient, queue: RecordingQueue
) -> None:
    jobs = [{"prompt": f"p{i}", "max_new_tokens": 4 if i % 2 else 40} for i in range(6)]
    response = client.post("/v1/jobs/bulk", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    ids = [job["id"] for job in response.json()["data"]]
    lanes = {job_id: lane for job_id, _, lane in queue.routes}
    assert [lanes[i] for i in ids] == ["normal", "express"] * 3
    assert len(queue.messages) == 2  # one message per queue


def test_each_owner_has_an_express_budget_and_then_goes_normal(
    client: TestClient, queue: RecordingQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The express queue is read before normal: one owner's flood of short jobs must not
    hold back long normal jobs sent before it, so past its burst they go to normal.
    (The budget refills too slowly here to matter however slow the test runs.)"""
    monkeypatch.setattr(express, "PACE", RateLimiter(1e-9, EXPRESS_BURST))
    lanes = [lane_of(client, queue, max_new_tokens=4) for _ in range(EXPRESS_BURST + 4)]
    assert lanes == ["express"] * EXPRESS_BURST + ["normal"] * 4
    jobs = [{"prompt": f"p{i}", "max_new_tokens": 4} for i in range(3)]
    response = client.post("/v1/jobs/bulk", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    assert [lane for _, _, lane in queue.routes[-3:]] == ["normal"] * 3


def test_no_express_queue_when_the_express_lane_is_off(settings: Settings) -> None:
    queue = RecordingQueue()
    off = settings.model_copy(update={"express_max_new_tokens": 0})
    with TestClient(create_app(off, queue=queue)) as client:
        assert lane_of(client, queue, max_new_tokens=4) == "normal"


def test_a_chat_jobs_length_is_its_messages() -> None:
    def row(content: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
        return {
            "priority": "normal",
            "prompt": "",
            "messages": messages,
            "params": {"max_new_tokens": 8},
        }

    assert sends_express(row("hello"), 16)
    assert not sends_express(row("hello " * 100), 16)
