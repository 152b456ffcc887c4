"""Idempotency-Key on POST /v1/files, /v1/batches and /v1/completions: a retry gets
the same object."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import Settings
from tests.conftest import RecordingQueue

LINE = {
    "custom_id": "a",
    "method": "POST",
    "url": "/v1/completions",
    "body": {"model": "fake", "prompt": "one two", "max_tokens": 3},
}


def upload(client: TestClient, content: bytes, key: str | None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    response = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
        headers=headers,
    )
    return {**response.json(), "http_status": response.status_code}


def test_a_retried_upload_returns_the_same_file_and_another_body_is_409(
    client: TestClient,
) -> None:
    content = (json.dumps(LINE) + "\n").encode()
    first = upload(client, content, "up-1")
    again = upload(client, content, "up-1")
    assert first["http_status"] == again["http_status"] == 200
    assert again["id"] == first["id"]
    assert len(client.get("/v1/files").json()["data"]) == 1
    other = upload(client, content + content.replace(b'"a"', b'"b"'), "up-1")
    assert other["http_status"] == 409
    assert other["error"]["code"] == "idempotency_key_reused"
    assert upload(client, content, None)["id"] != first["id"]


def test_a_retried_batch_returns_the_same_batch_and_another_body_is_409(
    client: TestClient,
) -> None:
    file_id = upload(client, (json.dumps(LINE) + "\n").encode(), None)["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    headers = {"Idempotency-Key": "batch-7"}
    first = client.post("/v1/batches", json=body, headers=headers)
    again = client.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/batches").json()["data"]) == 1
    changed = client.post("/v1/batches", json={**body, "metadata": {"run": "2"}}, headers=headers)
    assert changed.status_code == 409
    assert changed.json()["error"]["param"] == "Idempotency-Key"


def test_a_retried_completion_waits_on_the_same_job_and_another_body_is_409(
    settings: Settings, queue: RecordingQueue
) -> None:
    quick = settings.model_copy(update={"completion_wait_s": 0})  # no worker: answers 202
    body = {"model": "fake", "prompt": "one two", "max_tokens": 3}
    with TestClient(create_app(quick, queue=queue)) as client:
        first = client.post("/v1/completions", json=body, headers={"Idempotency-Key": "c1"})
        again = client.post("/v1/completions", json=body, headers={"Idempotency-Key": "c1"})
        other = client.post(
            "/v1/completions", json={**body, "prompt": "three"}, headers={"Idempotency-Key": "c1"}
        )
        fresh = client.post("/v1/completions", json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert fresh.json()["id"] != first.json()["id"]
    assert queue.sent == [first.json()["id"], fresh.json()["id"]]  # one job per key
