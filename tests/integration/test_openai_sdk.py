"""The official openai SDK, unmodified and pointed at genq with base_url, runs the whole
cycle against real `genq api` and `genq worker` processes (embedded default, auth on,
the tiny real model): files, batches, output and error files, cancel, completions."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

import migrations
from core import keys
from core.db import session_scope
from tests.integration.helpers import api_and_worker, free_port, genq_env, wait_until
from tests.tiny_model import STORIES, tiny_model_dir

pytestmark = pytest.mark.integration

FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def genq(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`genq api` and `genq worker` on the embedded default, with auth on, and two keys."""
    model = str(tiny_model_dir(tmp_path / "model"))
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'genq.db'}"
    migrations.upgrade(url)
    secrets = {}
    with session_scope(url) as session:
        for owner in ("alice", "bob"):
            _, secrets[owner] = keys.create_key(session, name=owner)
    port = free_port()
    env = genq_env(
        GENQ_DATA_DIR=str(data),
        GENQ_MODEL=model,
        GENQ_REQUIRE_AUTH="true",
        GENQ_MAX_BATCH_SIZE="16",
        GENQ_SWEEP_INTERVAL_S="1",
        GENQ_PROGRESS_INTERVAL_S="0.05",  # streamed text comes in several deltas
    )
    with api_and_worker(env, port, tmp_path) as (_, worker_log):
        yield {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": model,
            "keys": secrets,
            "log": worker_log,
        }


def request(custom_id: str, model: str, prompt: str, **body: Any) -> str:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": model, "prompt": prompt, **body},
    }
    return json.dumps(line) + "\n"


def poll(client: OpenAI, batch_id: str, log: Path, timeout: float = 180) -> Any:
    def final() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in FINAL else None

    return wait_until(final, timeout, f"batch {batch_id}", log)


def test_the_openai_sdk_runs_the_whole_batch_cycle(genq: dict[str, Any]) -> None:
    started = time.perf_counter()
    model = genq["model"]
    client = OpenAI(base_url=genq["base_url"], api_key=genq["keys"]["alice"], max_retries=0)

    content = (
        request("story", model, "Once upon a time", max_tokens=20, temperature=0)
        + request("sampled", model, "The little dog", max_tokens=10, seed=7, n=2)
        + request("too-long", model, "word " * 3000, max_tokens=5)
        + request("stopped", model, "Once upon a time", max_tokens=40, temperature=0, stop=".")
    )
    uploaded = client.files.create(file=("requests.jsonl", content.encode()), purpose="batch")
    assert uploaded.bytes == len(content.encode()) and uploaded.purpose == "batch"
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert client.files.content(uploaded.id).text == content

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"purpose": "sdk test"},
    )
    assert batch.status == "in_progress" and batch.metadata == {"purpose": "sdk test"}
    done = poll(client, batch.id, genq["log"])
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (4, 3)
    assert done.request_counts.failed == 1
    assert done.completed_at and done.finalizing_at and done.in_progress_at

    assert done.output_file_id and done.error_file_id
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in output] == ["story", "sampled", "stopped"]
    story = output[0]["response"]["body"]
    assert story["object"] == "text_completion"
    assert story["usage"]["completion_tokens"] <= 20
    assert len(output[1]["response"]["body"]["choices"]) == 2
    stopped = output[2]["response"]["body"]["choices"][0]
    if (STORIES / "config.json").is_file():  # the trained model: its greedy text is known
        assert story["choices"][0]["text"].startswith(", there was a little girl named Lily")
        assert stopped["finish_reason"] == "stop" and "." not in stopped["text"]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert [x["custom_id"] for x in errors] == ["too-long"]
    assert errors[0]["error"]["code"] == "prompt_too_long"
    assert errors[0]["response"]["status_code"] == 400

    # Each request is a job: readable through the jobs API, listed by batch.
    jobs = httpx.get(
        genq["base_url"] + "/jobs",
        params={"batch_id": batch.id},
        headers={"Authorization": f"Bearer {genq['keys']['alice']}"},
    ).json()["data"]
    assert sorted(j["custom_id"] for j in jobs) == ["sampled", "stopped", "story", "too-long"]

    # Cancel: a bigger batch, cancelled at once; finished requests are kept.
    many = "".join(
        request(f"r{i}", model, "Once upon a time", max_tokens=60, temperature=0)
        for i in range(200)
    )
    big = client.files.create(file=("many.jsonl", many.encode()), purpose="batch")
    to_cancel = client.batches.create(
        input_file_id=big.id, endpoint="/v1/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(to_cancel.id)
    assert cancelling.status in ("cancelling", "cancelled")
    cancelled = poll(client, to_cancel.id, genq["log"], timeout=60)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    counts = cancelled.request_counts
    assert counts is not None and counts.total == 200
    assert counts.completed + counts.failed == 200 and counts.failed > 0
    assert cancelled.error_file_id
    cancelled_lines = client.files.content(cancelled.error_file_id).text.splitlines()
    assert {json.loads(x)["error"]["code"] for x in cancelled_lines} == {"batch_cancelled"}

    # List batches, newest first, with the SDK's auto-pagination over `after`.
    listed = [b.id for b in client.batches.list(limit=1)]
    assert listed == [to_cancel.id, batch.id]
    first_page = client.batches.list(limit=1)
    assert first_page.has_more and first_page.data[0].id == to_cancel.id

    # Files: list, retrieve, delete.
    file_ids = {f.id for f in client.files.list()}
    assert {uploaded.id, big.id, done.output_file_id, done.error_file_id} <= file_ids
    assert client.files.delete(big.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(big.id)

    # Another owner sees none of it.
    bob = OpenAI(base_url=genq["base_url"], api_key=genq["keys"]["bob"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(done.output_file_id)
    assert list(bob.batches.list()) == []
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=genq["base_url"], api_key="genq_wrong", max_retries=0).files.list()

    # A bad file: the batch fails, its errors name the lines.
    bad = client.files.create(
        file=(
            "bad.jsonl",
            (request("a", model, "hi") + "{oops\n" + request("a", model, "hi")).encode(),
        ),
        purpose="batch",
    )
    failed = client.batches.create(
        input_file_id=bad.id, endpoint="/v1/completions", completion_window="24h"
    )
    assert failed.status == "failed" and failed.errors and failed.errors.data
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
    ]

    # One synchronous completion.
    completion = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens <= 8
    if (STORIES / "config.json").is_file():
        assert completion.choices[0].text.startswith(", there was a")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-99", prompt="hi")
    with pytest.raises(openai.BadRequestError) as bad_request:
        client.completions.create(model=model, prompt="hi", max_tokens=0)
    assert bad_request.value.code == "invalid_request"
    print(f"\nSDK cycle took {time.perf_counter() - started:.1f} s")


def test_the_openai_sdk_streams_completions(genq: dict[str, Any]) -> None:
    model = genq["model"]
    client = OpenAI(base_url=genq["base_url"], api_key=genq["keys"]["alice"], max_retries=0)
    asked: dict[str, Any] = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 120,
        "temperature": 0,
    }
    chunks = list(
        client.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    )
    whole = client.completions.create(**asked)

    assert len({(c.id, c.created) for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert {c.object for c in chunks} == {"text_completion"}
    *text_chunks, usage = chunks
    assert usage.choices == [] and usage.usage == whole.usage
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    finish = [c.choices[0].finish_reason for c in text_chunks]
    assert finish[-1] == whole.choices[0].finish_reason and not any(finish[:-1])
    print(f"\nstreamed {len(whole.choices[0].text)} characters in {len(text_chunks)} chunks")

    # A job that fails once the stream has begun: the SDK raises APIError.
    with pytest.raises(openai.APIError) as failed:
        for _ in client.completions.create(
            model=model, prompt="word " * 3000, max_tokens=5, stream=True
        ):
            pass
    assert not isinstance(failed.value, openai.APIStatusError)  # not an HTTP error status
    assert failed.value.code == "prompt_too_long"
