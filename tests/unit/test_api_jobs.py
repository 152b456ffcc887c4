"""The jobs API on SQLite and PostgreSQL, with a recording queue instead of a broker."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from core import delivery
from core.db import session_scope
from core.settings import Settings
from tests.conftest import RecordingQueue


def submit(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"prompt": "Once upon a time", **body})
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def test_submit_answers_202_with_the_queued_job_and_its_location(
    client: TestClient, queue: RecordingQueue
) -> None:
    response = client.post("/v1/jobs", json={"prompt": "Hello", "max_new_tokens": 40})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["prompt"] == "Hello"
    assert job["model"] == "fake"
    assert job["params"]["max_new_tokens"] == 40
    assert job["output"] is None and job["outputs"] is None
    assert job["attempts"] == 0
    assert job["usage"] == {"prompt_tokens": None, "completion_tokens": None}
    assert queue.sent == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


def test_omitted_parameters_mean_greedy_with_the_default_length_and_a_stored_seed(
    client: TestClient,
) -> None:
    job = submit(client)
    assert job["params"]["max_new_tokens"] == 16  # the settings' default in these tests
    assert job["params"]["do_sample"] is False
    assert job["params"]["num_beams"] == 1
    assert isinstance(job["reproducibility"]["seed"], int)
    given = submit(client, do_sample=True, seed=1234)
    assert given["reproducibility"]["seed"] == 1234


def test_the_classic_generate_call_is_expressible(client: TestClient) -> None:
    job = submit(client, max_length=50, num_beams=5, early_stopping=True)
    assert job["params"]["max_length"] == 50
    assert "max_new_tokens" not in job["params"]
    assert job["params"]["num_beams"] == 5
    assert job["params"]["early_stopping"] is True


def test_unknown_job_is_404_with_a_json_error(client: TestClient) -> None:
    response = client.get("/v1/jobs/job_doesnotexist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert client.post("/v1/jobs/job_nope/cancel").status_code == 404


def test_list_is_newest_first_with_cursor_pagination_and_a_status_filter(
    client: TestClient,
) -> None:
    ids = [submit(client, max_new_tokens=i + 1)["id"] for i in range(5)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")

    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == [ids[4], ids[3]]
    assert first["has_more"] is True
    second = client.get("/v1/jobs", params={"limit": 2, "after": first["next_after"]}).json()
    assert [j["id"] for j in second["data"]] == [ids[2], ids[1]]
    last = client.get("/v1/jobs", params={"limit": 2, "after": second["next_after"]}).json()
    assert [j["id"] for j in last["data"]] == [ids[0]]
    assert last["has_more"] is False and last["next_after"] is None

    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]]
    assert client.get("/v1/jobs", params={"status": "nonsense"}).status_code == 422


def test_cancel_a_queued_job_and_a_finished_one_cannot_be(
    client: TestClient, settings: Settings
) -> None:
    job = submit(client)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"

    done = submit(client)
    with session_scope(settings.resolved_database_url) as session:
        claim = delivery.claim_job(session, done["id"], worker="w1", lease_s=60, max_attempts=3)
        assert claim is not None
        delivery.finish_job(session, claim, _outcome())
    response = client.post(f"/v1/jobs/{done['id']}/cancel")
    assert response.status_code == 409
    assert "already succeeded" in response.json()["error"]["message"]


def _outcome() -> delivery.Outcome:
    return delivery.Outcome(
        outputs=["x"],
        finish_reasons=["length"],
        prompt_tokens=1,
        completion_tokens=1,
        model_revision="r",
        torch_version="t",
        transformers_version="tf",
    )


BAD_BODIES = [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({}, 422, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 10**9}, 422, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": -3}, 422, "max_new_tokens"),
    ({"prompt": "hi", "do_sample": True, "temperature": 0}, 422, "temperature"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "hi", "top_k": -1}, 422, "top_k"),
    ({"prompt": "hi", "num_beams": 0}, 422, "num_beams"),
    ({"prompt": "hi", "num_return_sequences": 3}, 422, "num_return_sequences"),
    ({"prompt": "hi", "max_new_tokens": 5, "max_length": 50}, 422, "max_length"),
    ({"prompt": "hi", "stop": [""]}, 422, "stop.0"),
    ({"prompt": "hi", "frobnicate": 1}, 422, "frobnicate"),
    ({"prompt": "hi", "max_new_tokens": "many"}, 422, "max_new_tokens"),
    ({"prompt": 42}, 422, "prompt"),
    ({"prompt": ["a", "b"]}, 422, "prompt"),
    ({"prompt": "hi", "do_sample": "sometimes"}, 422, "do_sample"),
    ({"prompt": "hi", "seed": -1}, 422, "seed"),
    ({"prompt": "hi", "model": "no-such-model"}, 422, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_input_gets_a_4xx_naming_the_problem_and_writes_nothing(
    client: TestClient, queue: RecordingQueue, body: dict[str, Any], status: int, param: str | None
) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] in ("invalid_request", "model_not_found")
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert queue.sent == []
    assert client.get("/v1/jobs").json()["data"] == []


def test_model_error_lists_the_available_models(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"prompt": "hi", "model": "gpt-99"})
    assert response.status_code == 422
    assert "available: fake" in response.json()["error"]["message"]


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert "not valid JSON" in response.json()["error"]["message"]


def test_a_job_survives_a_broker_outage_at_submit(
    client: TestClient, queue: RecordingQueue
) -> None:
    queue.down = True
    job = submit(client)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_health_and_readiness_say_what_is_down(client: TestClient, queue: RecordingQueue) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    queue.down = True
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["database"] == "ok"
    assert not_ready.json()["checks"]["broker"].startswith("unreachable")


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"]
    assert "/v1/jobs/{job_id}/cancel" in spec["paths"]


def test_an_idempotency_key_replays_the_same_job_and_rejects_another_body(
    client: TestClient, queue: RecordingQueue
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": 5}, headers=headers)
    again = client.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": 5}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert queue.sent == [first.json()["id"]]  # generated once
    other = client.post("/v1/jobs", json={"prompt": "bye", "max_new_tokens": 5}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    fresh = client.post("/v1/jobs", json={"prompt": "bye"}, headers={"Idempotency-Key": "o-43"})
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]


def test_priority_and_model_pick_the_queue(client: TestClient, queue: RecordingQueue) -> None:
    job = submit(client, priority="high", callback_url="https://example.com/hook")
    assert job["priority"] == "high"
    assert job["callback_url"] == "https://example.com/hook"
    assert queue.routes[-1] == (job["id"], "fake", "high")
    assert submit(client)["priority"] == "normal"
    for bad in ({"priority": "urgent"}, {"callback_url": "ftp://x"}, {"callback_url": "nope"}):
        response = client.post("/v1/jobs", json={"prompt": "hi", **bad})
        assert response.status_code == 422, bad


def test_models_are_listed_in_the_openai_shape(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake"]
    assert body["data"][0]["object"] == "model"
