"""``stream: true`` on /v1/completions and /v1/chat/completions, read over real HTTP
as it arrives (uvicorn in a thread, httpx), while an in-process worker runtime runs
the job with the fake engine sleeping per token, on SQLite and PostgreSQL.

The raw chunks are parsed here as OpenAI's format says; tests/integration runs the
official openai SDK against real processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from api.app import create_app
from core.db import get_engine
from core.models import LOCAL_OWNER
from core.queue import Route
from core.settings import Settings
from tests.conftest import serving
from worker.engine.fake import FakeEngine
from worker.runtime import WorkerRuntime

PROMPT = "one two three four five"
MESSAGES = [{"role": "user", "content": PROMPT}]


class ThreadQueue:
    """Runs each job on a thread as it is enqueued, as a worker would (or only
    records it while ``hold`` is set)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.sent: list[str] = []
        self.hold = False
        self.threads: list[threading.Thread] = []

    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        self.enqueue_many([Route(job_id, model or "fake", priority)])

    def enqueue_many(self, routes: Sequence[Route]) -> None:
        for route in routes:
            self.sent.append(route.job_id)
            if not self.hold:
                thread = threading.Thread(
                    target=self.runtime.run_job, args=(route.job_id,), kwargs={"worker": "w1"}
                )
                thread.start()
                self.threads.append(thread)

    def ping(self) -> None:
        pass

    def depth(self, queue: str) -> int:
        return 0


@pytest.fixture
def queue(settings: Settings) -> Iterator[ThreadQueue]:
    fast = settings.model_copy(update={"progress_interval_s": 0.05})
    runtime = WorkerRuntime(fast, FakeEngine(token_delay_s=0.05, max_prompt_words=20))
    threads = ThreadQueue(runtime)
    yield threads
    for thread in threads.threads:
        thread.join(timeout=30)
    runtime.close()


@pytest.fixture
def app_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The API's settings: ``settings`` with the test's overrides (indirect parameters)."""
    return settings.model_copy(update=getattr(request, "param", {}))


@pytest.fixture
def api(app_settings: Settings, queue: ThreadQueue) -> Iterator[httpx.Client]:
    app = create_app(app_settings, queue=queue)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def chunks(lines: Iterator[str]) -> Iterator[Any]:
    """OpenAI's stream: the JSON of each ``data:`` line, and ``"[DONE]"`` as is."""
    for line in lines:
        assert not line.startswith("event:"), "OpenAI's chunks are unnamed events"
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


def stream(client: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> list[Any]:
    with client.stream("POST", path, json={"model": "fake", **body}, **kw) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(chunks(response.iter_lines()))


def texts(received: list[Any], key: str = "text") -> dict[int, str]:
    """Each choice's text: its chunks' texts (chat: delta contents) concatenated."""
    out: dict[int, str] = {}
    for chunk in received:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") if key == "delta" else choice["text"]
            out[choice["index"]] = out.get(choice["index"], "") + (piece or "")
    return out


def test_a_streamed_completion_adds_up_to_the_answer(api: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    received = stream(
        api, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    answer = api.post("/v1/completions", json={"model": "fake", **body}).json()

    assert received[-1] == "[DONE]"
    *text_chunks, usage = received[:-1]
    assert usage["choices"] == [] and usage["usage"] == answer["usage"]
    assert usage["usage"]["completion_tokens"] == 40
    heads = {(c["id"], c["object"], c["created"], c["model"]) for c in received[:-1]}
    assert len(heads) == 1
    ((chunk_id, kind, _, model),) = heads
    assert chunk_id.startswith("cmpl-") and (kind, model) == ("text_completion", "fake")
    assert all(c["usage"] is None for c in text_chunks)  # null until the usage chunk
    assert texts(text_chunks) == {0: answer["choices"][0]["text"]}
    deltas = [c for c in text_chunks if c["choices"][0]["text"]]
    assert len(deltas) >= 2  # the text came as it was generated, not only at the end
    *_, last = text_chunks
    assert last["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    ]
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    job = api.get(f"/v1/jobs/{chunk_id.removeprefix('cmpl-')}").json()
    assert job["status"] == "succeeded" and job["output"] == answer["choices"][0]["text"]


def test_a_streamed_chat_completion_adds_up_to_the_answer(api: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 30, "stop": " two"}
    received = stream(api, "/v1/chat/completions", {**body, "stream": True})
    answer = api.post("/v1/chat/completions", json={"model": "fake", **body}).json()

    assert received[-1] == "[DONE]"
    parts = received[:-1]
    assert all("usage" not in c for c in parts)  # not asked for
    assert {(c["id"], c["object"], c["created"]) for c in parts} == {
        (parts[0]["id"], "chat.completion.chunk", parts[0]["created"])
    }
    assert parts[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert parts[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    content = answer["choices"][0]["message"]["content"]
    assert " two" not in content and content  # cut before the stop string
    assert texts(parts, "delta") == {0: content}


def test_several_choices_stream_by_index_and_logprobs_come_whole(api: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "n": 2, "seed": 1, "logprobs": 1}
    received = stream(api, "/v1/completions", {**body, "stream": True})
    answer = api.post("/v1/completions", json={"model": "fake", **body}).json()

    assert received[-1] == "[DONE]"
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in received[:-1]:
        (choice,) = chunk["choices"]
        by_index[choice["index"]].append(choice)
    for index, choices in by_index.items():
        expected = answer["choices"][index]
        # With logprobs the text comes whole, with its logprobs, then the finish.
        text, finish = choices
        assert (text["text"], text["logprobs"]) == (expected["text"], expected["logprobs"])
        assert finish["finish_reason"] == expected["finish_reason"] == "length"


def test_a_job_failing_mid_stream_ends_it_with_an_error_chunk(api: httpx.Client) -> None:
    too_long = [{"role": "user", "content": "word " * 30}]  # the fake engine takes 20
    received = stream(
        api, "/v1/chat/completions", {"messages": too_long, "max_tokens": 5, "stream": True}
    )
    role, error = received  # the stream had started; no [DONE] after the error
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert error["error"]["code"] == "prompt_too_long"
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]


def test_a_job_cancelled_mid_stream_ends_it_with_an_error_chunk(api: httpx.Client) -> None:
    body = {"model": "fake", "prompt": PROMPT, "max_tokens": 200, "stream": True}
    received: list[Any] = []
    with api.stream("POST", "/v1/completions", json=body) as response:
        for chunk in chunks(response.iter_lines()):
            received.append(chunk)
            if len(received) == 1:  # some text came: cancel the running job
                job_id = chunk["id"].removeprefix("cmpl-")
                assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert received[0]["choices"][0]["text"]
    assert received[-1]["error"]["code"] == "cancelled"
    assert "[DONE]" not in received


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("headers", "status"), [({}, "cancelled"), ({"Idempotency-Key": "k"}, "queued")]
)
def test_a_client_going_away_cancels_the_job_only_without_an_idempotency_key(
    api: httpx.Client, queue: ThreadQueue, headers: dict[str, str], status: str
) -> None:
    queue.hold = True  # the job stays queued: only the client's leaving can end it
    streams = api.app.state.streams  # type: ignore[attr-defined]
    body = {"model": "fake", "messages": MESSAGES, "stream": True}
    with api.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        received = chunks(response.iter_lines())  # kept: closing it would close the stream
        first = next(received)  # the role chunk: the stream is open
        assert streams.open(LOCAL_OWNER) == 1  # the owner's stream slot is held
    job_id = first["id"].removeprefix("chatcmpl-")
    wait_for(lambda: streams.open(LOCAL_OWNER) == 0, "the stream's slot given back")
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == status


@pytest.mark.parametrize("app_settings", [{"completion_wait_s": 0.3}], indirect=True)
def test_the_stream_lasts_at_most_the_completion_wait(
    api: httpx.Client, queue: ThreadQueue
) -> None:
    queue.hold = True
    received = stream(api, "/v1/completions", {"prompt": PROMPT, "stream": True})
    (error,) = received
    assert error["error"]["code"] == "timeout"
    job_id = queue.sent[0]
    assert f"/v1/jobs/{job_id}" in error["error"]["message"]
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # it goes on


def test_errors_before_the_stream_are_json(api: httpx.Client, queue: ThreadQueue) -> None:
    cases = [
        ({"model": "gpt-99", "prompt": "hi", "stream": True}, 404, "model"),
        (
            {"model": "fake", "prompt": "hi", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
        ),
        ({"model": "fake", "prompt": "hi", "stream": True, "max_tokens": 0}, 400, "max_tokens"),
    ]
    for body, status, param in cases:
        response = api.post("/v1/completions", json=body)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["param"] == param
    assert queue.sent == []
    assert api.app.state.streams.open(LOCAL_OWNER) == 0  # type: ignore[attr-defined]


def test_a_failing_read_mid_stream_ends_it_with_an_error_chunk_and_the_job_goes_on(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import completions

    real_poll = completions._poll
    broken = threading.Event()

    def poll(database_url: str, job_id: str) -> Any:
        if broken.is_set():  # the database went away while the stream was open
            raise OSError("connection refused")
        return real_poll(database_url, job_id)

    monkeypatch.setattr(completions, "_poll", poll)
    body = {"model": "fake", "prompt": PROMPT, "max_tokens": 20, "stream": True}
    received: list[Any] = []
    with api.stream("POST", "/v1/completions", json=body) as response:
        for chunk in chunks(response.iter_lines()):
            received.append(chunk)
            broken.set()  # the first chunk came: every read from now on fails
    # The stream is terminated with an error the SDK raises, not cut off...
    assert received[-1]["error"]["code"] == "internal_error"
    assert received[-1]["error"]["type"] == "server_error"
    job_id = received[0]["id"].removeprefix("cmpl-")
    assert f"/v1/jobs/{job_id}" in received[-1]["error"]["message"]
    assert "[DONE]" not in received
    # ...and the server's fault does not cancel the client's job: it goes on.
    wait_for(lambda: api.get(f"/v1/jobs/{job_id}").json()["status"] != "running", "the job to end")
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_a_stream_reads_the_prompt_and_messages_once_not_at_every_poll(
    api: httpx.Client, app_settings: Settings
) -> None:
    # A chat's messages and prompt are its row's largest columns (up to the 4 MiB
    # body): the stream polls every 0.2 s and needs neither after its start.
    engine = get_engine(app_settings.resolved_database_url)
    reads: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "job.messages" in statement:
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        long_chat = [{"role": "user", "content": "word " * 10}]
        body = {"messages": long_chat, "max_tokens": 30, "stream": True}
        received = stream(api, "/v1/chat/completions", body)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert received[-1] == "[DONE]"  # ~1.5 s of polls
    # The stream's first read and the worker's claim (the submit writes), not each poll.
    assert len(reads) <= 3, reads
