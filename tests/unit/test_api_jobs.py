"""The jobs API on SQLite and PostgreSQL, with a recording queue instead of a broker."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from core import jobstate
from core.db import get_engine, session_scope
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
        claim = jobstate.claim_job(session, done["id"], worker="w1", lease_s=60, max_attempts=3)
        assert claim is not None
        jobstate.store_outcomes(session, [(claim, _outcome())])
    response = client.post(f"/v1/jobs/{done['id']}/cancel")
    assert response.status_code == 409
    assert "already succeeded" in response.json()["error"]["message"]


def _outcome() -> jobstate.Outcome:
    return jobstate.Outcome(
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
    # Values that can only give non-finite scores.
    ({"prompt": "hi", "do_sample": True, "temperature": 3.79e-38}, 422, "temperature"),
    ({"prompt": "hi", "repetition_penalty": 1e-30}, 422, "repetition_penalty"),
    ({"prompt": "hi", "num_beams": 2, "length_penalty": 1e9}, 422, "length_penalty"),
    # Beam sampling returns at most num_beams sequences, as generate does.
    (
        {"prompt": "hi", "num_beams": 2, "do_sample": True, "num_return_sequences": 3},
        422,
        "num_return_sequences",
    ),
    # More than a worker's batch holds (the test settings' defaults: 64 rows, 65,536 tokens).
    ({"prompt": "hi", "num_beams": 16, "max_new_tokens": 4096}, 422, "max_new_tokens"),
    ({"prompt": "hi", "num_beams": 16, "max_length": 16384}, 422, "max_length"),
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


def _bulk(client: TestClient, jobs: list[dict[str, Any]], **headers: str) -> Any:
    return client.post("/v1/jobs/bulk", json={"jobs": jobs}, headers=headers)


def test_a_bulk_submit_queues_every_job_in_order_a_few_per_message(
    client: TestClient, queue: RecordingQueue
) -> None:
    bodies: list[dict[str, Any]] = [
        {"prompt": f"prompt {i}", "max_new_tokens": 3} for i in range(19)
    ]
    bodies[4]["priority"] = "high"
    response = _bulk(client, bodies)
    assert response.status_code == 202, response.text
    jobs = response.json()["data"]
    assert [j["prompt"] for j in jobs] == [b["prompt"] for b in bodies]
    assert all(j["status"] == "queued" and j["params"]["max_new_tokens"] == 3 for j in jobs)
    ids = [j["id"] for j in jobs]
    assert ids == sorted(ids) and len(set(ids)) == 19  # they also list in submission order
    # One message per 8 ids of the same model and queue; every job sent once. The short
    # normal jobs fill the owner's express burst (16: two messages), the high one goes
    # alone to its queue, the last two short ones to normal.
    assert sorted(queue.sent) == sorted(ids)
    assert [len(m) for m in queue.messages] == [8, 8, 1, 2]
    assert queue.messages[2] == [jobs[4]["id"]]
    lanes = [lane for _, _, lane in queue.routes]
    assert lanes == ["express"] * 16 + ["high"] + ["normal"] * 2
    listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    assert [j["id"] for j in reversed(listed)] == ids


@pytest.mark.parametrize(
    ("jobs", "param"),
    [
        ([{"prompt": "fine"}, {"prompt": "fine"}, {"prompt": "  "}], "jobs.2.prompt"),
        ([{"prompt": "fine"}, {"prompt": "x", "temperature": -1}], "jobs.1.temperature"),
        ([{"prompt": "fine"}, {"prompt": "x", "model": "gpt-99"}], "jobs.1.model"),
        (
            [{"prompt": "fine"}, {"prompt": "x", "num_beams": 16, "max_new_tokens": 4096}],
            "jobs.1.max_new_tokens",
        ),
        ([], "jobs"),
        ([{"prompt": "x"}] * 10_001, "jobs"),
    ],
)
def test_a_bulk_submit_with_one_bad_job_queues_none_and_names_it(
    client: TestClient, queue: RecordingQueue, jobs: list[dict[str, Any]], param: str
) -> None:
    response = _bulk(client, jobs)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param
    assert queue.sent == []
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_bulk_submit_survives_a_broker_outage(client: TestClient, queue: RecordingQueue) -> None:
    queue.down = True
    response = _bulk(client, [{"prompt": "a"}, {"prompt": "b"}])
    assert response.status_code == 202
    for job in response.json()["data"]:
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_a_bulk_submit_retried_with_its_idempotency_key_gets_the_same_jobs(
    client: TestClient, queue: RecordingQueue
) -> None:
    bodies = [{"prompt": f"p{i}"} for i in range(3)]
    first = _bulk(client, bodies, **{"Idempotency-Key": "bulk-1"})
    again = _bulk(client, bodies, **{"Idempotency-Key": "bulk-1"})
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert [j["id"] for j in again.json()["data"]] == [j["id"] for j in first.json()["data"]]
    assert len(queue.sent) == 3  # sent once
    other = _bulk(client, bodies[:2], **{"Idempotency-Key": "bulk-1"})
    assert other.status_code == 409
    # A key used for one job is not confused with a bulk submit's.
    single = client.post("/v1/jobs", json={"prompt": "p0"}, headers={"Idempotency-Key": "bulk-1"})
    assert single.status_code == 409


def _statements_listing(client: TestClient, url: str, limit: int) -> tuple[int, int]:
    """(statements run, jobs listed) by one ``GET /v1/jobs?limit=...``."""
    engine = get_engine(url)
    seen: list[str] = []

    def count(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        response = client.get(f"/v1/jobs?limit={limit}")
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert response.status_code == 200
    return len(seen), len(response.json()["data"])


def test_listing_jobs_runs_a_constant_number_of_statements(
    client: TestClient, settings: Settings
) -> None:
    # Final jobs with webhook deliveries: the case that used to cost a query per job.
    url = settings.resolved_database_url
    for _ in range(3):
        job = submit(client, callback_url="http://hooks.test/x")
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    few, listed = _statements_listing(client, url, 100)
    assert listed == 3
    for _ in range(40):
        job = submit(client, callback_url="http://hooks.test/x")
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    many, listed = _statements_listing(client, url, 100)
    assert listed == 43
    assert many == few
    page = client.get("/v1/jobs?limit=100").json()["data"]
    assert all(job["webhook"]["event"] == "job.cancelled" for job in page)
