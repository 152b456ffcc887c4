"""/v1/jobs/{id}/events: server-sent events read over real HTTP while a job runs.

The API is served by uvicorn in a thread and read with httpx, so the stream is
read as it arrives; the job runs on an in-process worker runtime with the fake
engine sleeping per token, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core import keys
from core.db import session_scope
from core.models import LOCAL_OWNER
from core.settings import Settings
from tests.conftest import RecordingQueue, serving
from worker.engine.fake import FakeEngine
from worker.runtime import WorkerRuntime

Event = tuple[str, dict[str, Any]]


@pytest.fixture
def runtime(settings: Settings) -> Iterator[WorkerRuntime]:
    fast = settings.model_copy(update={"progress_interval_s": 0.05})
    rt = WorkerRuntime(fast, FakeEngine(token_delay_s=0.05))
    yield rt
    rt.close()


@pytest.fixture
def base_url(settings: Settings) -> Iterator[str]:
    """The API served over real HTTP from a thread."""
    with serving(create_app(settings, queue=RecordingQueue())) as url:
        yield url


def read_events(lines: Iterator[str]) -> Iterator[Event]:
    """Parse server-sent events (``event:`` and one ``data:`` line each)."""
    name, data = "message", ""
    for line in lines:
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data = line.removeprefix("data:").strip()
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


def test_the_stream_follows_a_running_job_to_its_end(base_url: str, runtime: WorkerRuntime) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        body = {"prompt": "one two three four five", "max_new_tokens": 40}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        events: list[Event] = []
        worker: threading.Thread | None = None
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for event in read_events(response.iter_lines()):
                events.append(event)
                if worker is None:  # the stream is open: now let the job run
                    worker = threading.Thread(
                        target=runtime.run_job, args=(job_id,), kwargs={"worker": "w1"}
                    )
                    worker.start()
        assert worker is not None
        worker.join(timeout=30)
        final = client.get(f"/v1/jobs/{job_id}").json()

    names = [name for name, _ in events]
    assert names[0] == "status" and events[0][1]["status"] == "queued"
    assert names[-1] == "done" and events[-1][1] == final
    statuses = [data["status"] for name, data in events if name == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    tokens = [data for name, data in events if name == "token"]
    assert len(tokens) >= 2
    assert "".join(t["delta"] for t in tokens) == final["output"]
    counts = [t["tokens"] for t in tokens]
    assert counts == sorted(counts) and counts[-1] == 40
    assert final["status"] == "succeeded"


def test_a_finished_job_gives_its_status_and_done_at_once(
    client: TestClient, runtime: WorkerRuntime
) -> None:
    job_id = client.post("/v1/jobs", json={"prompt": "a b", "max_new_tokens": 3}).json()["id"]
    assert runtime.run_job(job_id, worker="w1") == "succeeded"
    response = client.get(f"/v1/jobs/{job_id}/events")
    events = list(read_events(iter(response.text.splitlines())))
    assert [name for name, _ in events] == ["status", "token", "done"]
    assert events[1][1] == {"delta": " b a b", "tokens": 3}
    assert events[2][1]["output"] == " b a b"


def test_a_stream_joined_mid_run_starts_with_the_output_so_far(
    base_url: str, runtime: WorkerRuntime
) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        body = {"prompt": "one two three four five", "max_new_tokens": 60}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        worker = threading.Thread(target=runtime.run_job, args=(job_id,), kwargs={"worker": "w1"})
        worker.start()
        deadline = time.monotonic() + 30
        while True:  # join once some text is generated and stored, well before the end
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["usage"]["completion_tokens"]:
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.02)
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            events = list(read_events(response.iter_lines()))
        worker.join(timeout=30)
        final = client.get(f"/v1/jobs/{job_id}").json()

    assert [name for name, _ in events[:2]] == ["status", "token"]
    joined_at = events[0][1]
    assert joined_at["status"] == "running" and joined_at["output"]
    assert events[1][1]["delta"].startswith(joined_at["output"])
    assert events[1][1]["tokens"] < 60  # joined mid-run, not after the end
    tokens = [data for name, data in events if name == "token"]
    assert not any(t.get("reset") for t in tokens)
    assert "".join(t["delta"] for t in tokens) == final["output"]
    assert final["status"] == "succeeded" and events[-1] == ("done", final)


def test_the_stream_ends_at_its_maximum_duration(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json={"prompt": "never run"}).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/events", params={"max_s": 0.5})
    events = list(read_events(iter(response.text.splitlines())))
    assert [name for name, _ in events] == ["status", "timeout"]
    assert events[-1][1]["status"] == "queued"


def test_a_failing_read_ends_the_stream_with_an_error_event(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import events

    job_id = client.post("/v1/jobs", json={"prompt": "never run"}).json()["id"]

    def read(database_url: str, job_id: str) -> None:
        raise OSError("connection refused")  # the database went away mid-stream

    monkeypatch.setattr(events, "_read", read)
    response = client.get(f"/v1/jobs/{job_id}/events", params={"max_s": 5})
    received = list(read_events(iter(response.text.splitlines())))
    assert [name for name, _ in received] == ["status", "error"]
    assert received[-1][1]["code"] == "internal_error"
    assert client.app.state.streams.open(LOCAL_OWNER) == 0  # type: ignore[attr-defined]


def test_events_are_owner_checked(settings: Settings) -> None:
    auth = settings.model_copy(update={"require_auth": True})
    with session_scope(auth.resolved_database_url) as session:
        _, alice = keys.create_key(session, name="a", owner="alice")
        _, bob = keys.create_key(session, name="b", owner="bob")
    with TestClient(create_app(auth, queue=RecordingQueue())) as client:
        headers = {"Authorization": f"Bearer {alice}"}
        job = client.post("/v1/jobs", json={"prompt": "hi"}, headers=headers).json()
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
        url = f"/v1/jobs/{job['id']}/events"
        assert client.get(url).status_code == 401
        other = client.get(url, headers={"Authorization": f"Bearer {bob}"})
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "not_found"
        own = client.get(url, headers=headers)
        assert own.status_code == 200
        assert [n for n, _ in read_events(iter(own.text.splitlines()))] == ["status", "done"]
        assert client.get("/v1/jobs/job_nope/events", headers=headers).status_code == 404
