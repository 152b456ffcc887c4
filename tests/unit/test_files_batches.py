"""Files and batches through the API (SQLite and PostgreSQL), jobs run by a real
WorkerRuntime with the fake engine, inline as they are enqueued."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.app import create_app
from core import batches, feed, keys
from core.db import get_sessionmaker, session_scope
from core.models import Batch
from core.queue import Route
from core.settings import Settings
from worker.engine.fake import FakeEngine
from worker.runtime import WorkerRuntime

LONG = " ".join(["word"] * 50)  # longer than the fake engine's 20-word context


class InlineQueue:
    """Runs each job as it is enqueued (or only records it while ``hold`` is set)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.sent: list[str] = []
        self.hold = False

    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        self.enqueue_many([Route(job_id, model or "fake", priority)])

    def enqueue_many(self, routes: Sequence[Route]) -> None:
        ids = [route.job_id for route in routes]
        self.sent.extend(ids)
        if not self.hold:
            self.runtime.run_jobs(ids, worker="w1")

    def ping(self) -> None:
        pass

    def depth(self, queue: str) -> int:
        return 0

    def queued_jobs(self, queue: str) -> int:
        return 0

    def run_held(self, count: int | None = None, threads: int = 1) -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda j: self.runtime.run_job(j, worker="w1"), self.sent[:count]))


@pytest.fixture
def runtime(settings: Settings) -> Iterator[WorkerRuntime]:
    rt = WorkerRuntime(settings, FakeEngine(max_prompt_words=20))
    yield rt
    rt.close()


@pytest.fixture
def inline(runtime: WorkerRuntime) -> InlineQueue:
    return InlineQueue(runtime)


@pytest.fixture
def api(settings: Settings, inline: InlineQueue) -> Iterator[TestClient]:
    with TestClient(create_app(settings, queue=inline)) as client:
        yield client


def line(custom_id: str, prompt: str = "one two three", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "fake", "prompt": prompt, "max_tokens": 3, **body},
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(client: TestClient, content: bytes, name: str = "in.jsonl") -> dict[str, Any]:
    response = client.post("/v1/files", files={"file": (name, content)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    file: dict[str, Any] = response.json()
    return file


def create(client: TestClient, file_id: str) -> dict[str, Any]:
    response = client.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


def content_lines(client: TestClient, file_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200
    meta = client.get(f"/v1/files/{file_id}").json()
    assert meta["bytes"] == len(response.content)
    return [json.loads(x) for x in response.content.splitlines()]


def finalized(api: TestClient, settings: Settings, batch_id: str) -> dict[str, Any]:
    """The batch after the background finalizing pass (the workers' feeder runs it)."""
    batches.finalize_due(get_sessionmaker(settings.resolved_database_url))
    answer: dict[str, Any] = api.get(f"/v1/batches/{batch_id}").json()
    return answer


def test_files_upload_list_retrieve_content_and_delete(api: TestClient) -> None:
    content = jsonl(line("a"), line("b"))
    file = upload(api, content)
    assert file["object"] == "file" and file["purpose"] == "batch"
    assert file["bytes"] == len(content) and file["filename"] == "in.jsonl"
    assert file["id"].startswith("file-")
    assert api.get(f"/v1/files/{file['id']}").json() == file
    assert api.get(f"/v1/files/{file['id']}/content").content == content
    second = upload(api, b"x\n", name="two.jsonl")
    listed = api.get("/v1/files").json()
    assert [f["id"] for f in listed["data"]] == [second["id"], file["id"]]
    page = api.get("/v1/files", params={"limit": 1}).json()
    assert page["has_more"] is True and page["last_id"] == second["id"]
    rest = api.get("/v1/files", params={"limit": 1, "after": page["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == [file["id"]] and rest["has_more"] is False
    deleted = api.delete(f"/v1/files/{file['id']}")
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    for path in (f"/v1/files/{file['id']}", f"/v1/files/{file['id']}/content"):
        missing = api.get(path)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = api.post("/v1/files", files={"file": ("x", b"x")}, data={"purpose": "fine-tune"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "purpose"


def test_a_batch_runs_to_completed_with_output_and_error_files(
    api: TestClient, inline: InlineQueue, settings: Settings
) -> None:
    lines = [line("a"), line("b", "four five", n=2, temperature=0.7), line("c", LONG)]
    lines.append(line("d", "six seven", stop="seven", temperature=0))
    batch = create(api, upload(api, jsonl(*lines))["id"])
    assert batch["object"] == "batch" and batch["status"] == "in_progress"
    assert batch["request_counts"]["total"] == 4
    assert batch["in_progress_at"] and batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert len(inline.sent) == 4

    # Every request is done: the counts say so, but a read does not finalize.
    read = api.get(f"/v1/batches/{batch['id']}").json()
    assert read["status"] == "in_progress" and read["output_file_id"] is None
    assert read["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert read["usage"]["output_tokens"] == 3 + 6 + 1
    done = finalized(api, settings, batch["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert done["completed_at"] >= done["finalizing_at"] >= done["created_at"]
    assert done["usage"]["output_tokens"] == 3 + 6 + 1

    output = content_lines(api, done["output_file_id"])
    assert [x["custom_id"] for x in output] == ["a", "b", "d"]
    first = output[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == "fake"
    assert body["choices"] == [
        {"index": 0, "text": " three two one", "finish_reason": "length", "logprobs": None}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert len(output[1]["response"]["body"]["choices"]) == 2
    assert output[2]["response"]["body"]["choices"][0]["finish_reason"] == "stop"

    errors = content_lines(api, done["error_file_id"])
    assert [x["custom_id"] for x in errors] == ["c"]
    assert errors[0]["error"]["code"] == "prompt_too_long"
    assert errors[0]["response"]["status_code"] == 400

    jobs = api.get("/v1/jobs", params={"batch_id": batch["id"]}).json()["data"]
    assert sorted(j["custom_id"] for j in jobs) == ["a", "b", "c", "d"]
    one = api.get(f"/v1/jobs/{output[0]['response']['request_id']}").json()
    assert one["batch_id"] == batch["id"] and one["custom_id"] == "a"
    assert one["params"]["max_new_tokens"] == 3 and one["params"]["do_sample"] is True
    greedy = api.get(f"/v1/jobs/{output[2]['response']['request_id']}").json()
    assert greedy["params"]["do_sample"] is False
    assert api.get("/v1/files", params={"purpose": "batch_output"}).json()["data"]


def test_batches_are_listed_newest_first_with_after_and_limit(api: TestClient) -> None:
    file_id = upload(api, jsonl(line("a")))["id"]
    ids = [create(api, file_id)["id"] for _ in range(3)]
    first = api.get("/v1/batches", params={"limit": 2}).json()
    assert [b["id"] for b in first["data"]] == [ids[2], ids[1]] and first["has_more"]
    rest = api.get("/v1/batches", params={"limit": 2, "after": first["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]


def test_cancel_keeps_finished_requests_and_cancels_the_rest(
    api: TestClient, inline: InlineQueue, settings: Settings
) -> None:
    inline.hold = True
    batch = create(api, upload(api, jsonl(*(line(f"r{i}") for i in range(5))))["id"])
    inline.run_held(2)
    cancelled = api.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelling" and cancelled.json()["cancelling_at"]
    inline.run_held()  # the rest were cancelled: the worker skips them
    final = finalized(api, settings, batch["id"])
    assert final["status"] == "cancelled" and final["cancelled_at"]
    assert final["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
    assert [x["custom_id"] for x in content_lines(api, final["output_file_id"])] == ["r0", "r1"]
    errors = content_lines(api, final["error_file_id"])
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert api.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "cancelled"

    inline.hold = False
    done = create(api, upload(api, jsonl(line("x")))["id"])
    finalized(api, settings, done["id"])
    again = api.post(f"/v1/batches/{done['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert api.post("/v1/batches/batch_nope/cancel").status_code == 404


def test_an_expired_batch_cancels_what_did_not_run(
    api: TestClient, inline: InlineQueue, settings: Settings
) -> None:
    inline.hold = True
    batch = create(api, upload(api, jsonl(line("a"), line("b")))["id"])
    inline.run_held(1)
    with session_scope(settings.resolved_database_url) as session:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        session.execute(update(Batch).where(Batch.id == batch["id"]).values(expires_at=past))
    final = finalized(api, settings, batch["id"])
    assert final["status"] == "expired" and final["expired_at"]
    assert final["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    errors = content_lines(api, final["error_file_id"])
    assert errors[0]["custom_id"] == "b" and errors[0]["error"]["code"] == "batch_expired"


def test_the_sweeper_finalizes_batches(
    api: TestClient, inline: InlineQueue, settings: Settings
) -> None:
    from worker.sweeper import Sweeper

    batch = create(api, upload(api, jsonl(line("a")))["id"])
    report = Sweeper(settings, inline, holder="t").sweep_once()
    assert report["batches_finalized"] == 1
    with session_scope(settings.resolved_database_url) as session:
        assert session.get_one(Batch, batch["id"]).status == "completed"


BAD_LINES: list[tuple[str, str, str | None]] = [
    ('{"custom_id": "x", "method": "POST"', "invalid_json_line", None),
    ("[1, 2]", "invalid_json_line", None),
    (json.dumps(line("a")), "duplicate_custom_id", "custom_id"),
    (json.dumps({**line("u"), "url": "/v1/chat/completions"}), "invalid_url", "url"),
    (json.dumps({**line("u"), "url": "/v1/embeddings"}), "invalid_url", "url"),
    (json.dumps({**line("m"), "method": "GET"}), "invalid_method", "method"),
    (json.dumps(line("m", model="gpt-99")), "model_not_found", "body.model"),
    (json.dumps(line("r", max_tokens=0)), "invalid_request", "body.max_tokens"),
    (json.dumps(line("r", max_tokens=10**6)), "invalid_request", "body.max_tokens"),
    (json.dumps(line("r", temperature=3)), "invalid_request", "body.temperature"),
    (json.dumps(line("r", top_p=1.5)), "invalid_request", "body.top_p"),
    (json.dumps(line("r", n=3, temperature=0)), "invalid_request", "body.n"),
    (json.dumps(line("r", stream=True)), "invalid_request", "body.stream"),
    (json.dumps(line("r", frobnicate=1)), "invalid_request", "body.frobnicate"),
    (json.dumps(line("r", prompt="   ")), "invalid_request", "body.prompt"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "missing_required_parameter", "custom_id"),  # noqa: E501
    (json.dumps({k: v for k, v in line("x").items() if k != "body"}), "missing_required_parameter", "body"),  # noqa: E501
    (json.dumps({**line("p"), "body": {"model": "fake"}}), "missing_required_parameter", "body.prompt"),  # noqa: E501
    (json.dumps({**line("p"), "body": {"prompt": "hi"}}), "missing_required_parameter", "body.model"),  # noqa: E501
    (json.dumps({**line("p"), "extra": 1}), "invalid_request", "extra"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "code", "param"), BAD_LINES)
def test_a_bad_line_fails_the_batch_naming_the_line_and_nothing_is_queued(
    api: TestClient, inline: InlineQueue, bad: str, code: str, param: str | None
) -> None:
    batch = create(api, upload(api, jsonl(line("a"), line("b"), bad, line("c")))["id"])
    assert batch["status"] == "failed" and batch["failed_at"]
    assert batch["errors"]["object"] == "list"
    [error] = batch["errors"]["data"]
    assert error["line"] == 3 and error["code"] == code, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert batch["request_counts"]["total"] == 3 if code != "invalid_json_line" else True
    assert inline.sent == []
    assert api.get("/v1/jobs").json()["data"] == []
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] == "failed"


def test_a_line_too_large_for_a_worker_fails_the_batch_at_create(
    settings: Settings, inline: InlineQueue
) -> None:
    """The check every door makes at submit (core.submit.check_fits) is made per line
    at ingest too, so such a line is named at create instead of failing at a worker."""
    small = settings.model_copy(update={"max_tokens_in_flight": 100, "max_batch_size": 4})
    with TestClient(create_app(small, queue=inline)) as api:
        lines = [line("ok"), line("long", max_tokens=200), line("wide", n=8, temperature=1)]
        batch = create(api, upload(api, jsonl(*lines, line("fits", max_tokens=99)))["id"])
        assert batch["status"] == "failed", batch
        errors = [(e["line"], e["code"], e["param"]) for e in batch["errors"]["data"]]
        assert errors == [
            (2, "invalid_request", "body.max_tokens"),
            (3, "invalid_request", "body.n"),
        ]
        assert "max_tokens_in_flight" in batch["errors"]["data"][0]["message"]
        assert inline.sent == [] and api.get("/v1/jobs").json()["data"] == []


def test_every_bad_line_is_named_up_to_a_cap(api: TestClient, inline: InlineQueue) -> None:
    lines: list[dict[str, Any] | str] = [line("ok")]
    lines += ["not json"] * 150
    batch = create(api, upload(api, jsonl(*lines))["id"])
    data = batch["errors"]["data"]
    assert [e["line"] for e in data[:100]] == list(range(2, 102))
    assert data[-1]["code"] == "too_many_errors" and "50 more" in data[-1]["message"]
    assert inline.sent == []


def test_empty_file_and_unknown_input_file(api: TestClient) -> None:
    batch = create(api, upload(api, b"\n\n")["id"])
    assert batch["status"] == "failed"
    assert batch["errors"]["data"][0]["code"] == "empty_file"
    missing = api.post(
        "/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/completions"}
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "input_file_id"
    file_id = upload(api, jsonl(line("a")))["id"]
    for field, value in (("endpoint", "/v1/embeddings"), ("completion_window", "soon")):
        bad = api.post("/v1/batches", json={"input_file_id": file_id, field: value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field


def test_limits_on_bytes_and_lines(settings: Settings, inline: InlineQueue) -> None:
    small = settings.model_copy(update={"max_file_bytes": 2048, "max_batch_lines": 3})
    with TestClient(create_app(small, queue=inline)) as client:
        ok = upload(client, jsonl(line("a"), line("b"), line("c")))
        assert ok["bytes"] < 2048
        too_many = client.post(
            "/v1/files",
            files={"file": ("f.jsonl", jsonl(*(line(str(i)) for i in range(4))))},
            data={"purpose": "batch"},
        )
        assert too_many.status_code == 400
        assert too_many.json()["error"]["code"] == "too_many_lines"
        assert "GENQ_MAX_BATCH_LINES" in too_many.json()["error"]["message"]
        for size in (3000, 200_000):  # the route's check, and the body limit's
            big = client.post(
                "/v1/files", files={"file": ("f.jsonl", b"x" * size)}, data={"purpose": "batch"}
            )
            assert big.status_code == 413, big.text
            assert big.json()["error"]["code"] in ("file_too_large", "request_too_large")
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [ok["id"]]


def test_each_owner_sees_only_its_own_files_and_batches(
    settings: Settings, inline: InlineQueue
) -> None:
    auth = settings.model_copy(update={"require_auth": True})
    headers = {}
    for owner in ("alice", "bob"):
        with session_scope(auth.resolved_database_url) as session:
            _, secret = keys.create_key(session, name=owner)
        headers[owner] = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(auth, queue=inline)) as client:
        client.headers.update(headers["alice"])
        file = upload(client, jsonl(line("a")))
        batch = create(client, file["id"])
        done = client.get(f"/v1/batches/{batch['id']}").json()
        job_id = client.get("/v1/jobs", params={"batch_id": batch["id"]}).json()["data"][0]["id"]
        client.headers.update(headers["bob"])
        for path in (
            f"/v1/files/{file['id']}",
            f"/v1/files/{file['id']}/content",
            f"/v1/files/{done['output_file_id']}/content",
            f"/v1/batches/{batch['id']}",
            f"/v1/jobs/{job_id}",
        ):
            assert client.get(path).status_code == 404, path
        assert client.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
        assert client.delete(f"/v1/files/{file['id']}").status_code == 404
        bob_batch = client.post("/v1/batches", json={"input_file_id": file["id"]})
        assert bob_batch.status_code == 404
        assert client.get("/v1/batches").json()["data"] == []
        assert client.get("/v1/files").json()["data"] == []
        client.headers.pop("Authorization")
        assert client.get("/v1/batches").status_code == 401


def test_completions_waits_for_its_job(api: TestClient, inline: InlineQueue) -> None:
    body = {"model": "fake", "prompt": "one two three", "max_tokens": 2, "temperature": 0}
    response = api.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == " three two"
    assert completion["usage"]["total_tokens"] == 5
    failed = api.post("/v1/completions", json={**body, "prompt": LONG})
    assert failed.status_code == 400 and failed.json()["error"]["code"] == "prompt_too_long"
    bad = api.post("/v1/completions", json={**body, "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    unknown = api.post("/v1/completions", json={**body, "model": "gpt-99"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_completions_answers_202_with_the_job_when_the_wait_runs_out(
    settings: Settings, inline: InlineQueue
) -> None:
    inline.hold = True
    quick = settings.model_copy(update={"completion_wait_s": 0.2})
    with TestClient(create_app(quick, queue=inline)) as client:
        response = client.post("/v1/completions", json={"model": "fake", "prompt": "a b"})
        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued" and job["params"]["max_new_tokens"] == 16
        inline.run_held()
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_10000_line_file_is_ingested_in_bulk_and_fully_processed(
    api: TestClient, inline: InlineQueue, settings: Settings
) -> None:
    n = 10_000
    content = jsonl(*(line(f"req-{i}", f"prompt number {i}", max_tokens=2) for i in range(n)))
    file = upload(api, content)
    inline.hold = True
    started = time.perf_counter()
    batch = create(api, file["id"])
    elapsed = time.perf_counter() - started
    print(f"\ningested {n} lines in {elapsed:.2f} s: {n / elapsed:,.0f} lines/s (incl. enqueue)")
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == n
    assert len(inline.sent) == settings.feed_ahead  # the first window (core.feed)
    factory = get_sessionmaker(settings.resolved_database_url)
    while len(inline.sent) < n:  # this broker reports nothing waiting: a window each time
        sent = feed.feed_once(factory, inline, settings)
        assert 0 < sum(sent.values()) <= settings.feed_ahead
    assert inline.sent == sorted(set(inline.sent))  # each once, in input order
    started = time.perf_counter()
    inline.run_held(threads=2)
    print(f"processed {n} jobs in {time.perf_counter() - started:.1f} s (fake engine, inline)")
    done = finalized(api, settings, batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}
    output = api.get(f"/v1/files/{done['output_file_id']}/content").content.splitlines()
    assert len(output) == n
    assert json.loads(output[0])["custom_id"] == "req-0"
    assert json.loads(output[-1])["custom_id"] == f"req-{n - 1}"


def test_a_finished_batch_is_finalized_however_many_older_batches_are_open(
    api: TestClient, inline: InlineQueue, settings: Settings
) -> None:
    """The finalizing pass reaches every open batch, not only the oldest ``limit``."""
    inline.hold = True
    created = [create(api, upload(api, jsonl(line(f"c{i}")))["id"]) for i in range(3)]
    newest = api.get(f"/v1/batches/{created[-1]['id']}").json()
    assert newest["status"] == "in_progress"
    jobs = api.get("/v1/jobs", params={"limit": 10}).json()["data"]
    newest_job = next(job for job in jobs if job["batch_id"] == created[-1]["id"])
    assert api.post(f"/v1/jobs/{newest_job['id']}/cancel").status_code == 200
    factory = get_sessionmaker(settings.resolved_database_url)
    assert batches.finalize_due(factory, limit=1) == 1
    assert api.get(f"/v1/batches/{created[-1]['id']}").json()["status"] == "completed"
    assert [api.get(f"/v1/batches/{b['id']}").json()["status"] for b in created[:2]] == [
        "in_progress",
        "in_progress",
    ]
