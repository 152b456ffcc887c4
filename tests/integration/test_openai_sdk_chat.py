"""The official openai SDK, unmodified: chat completions (with logprobs and a JSON
schema), and Files + Batches with chat lines, against real `genq api` and `genq worker`
processes serving a tiny model whose tokenizer has a chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI

import migrations
from tests.integration.helpers import api_and_worker, free_port, genq_env
from tests.integration.test_openai_sdk import poll
from tests.tiny_model import tiny_chat_model_dir

pytestmark = pytest.mark.integration

MESSAGES: list[Any] = [
    {"role": "system", "content": "You tell stories."},
    {"role": "user", "content": "Once upon a time"},
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture
def genq(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`genq api` and `genq worker` on the embedded default, serving a chat model."""
    model = str(tiny_chat_model_dir(tmp_path / "model"))
    data = tmp_path / "data"
    migrations.upgrade(f"sqlite:///{data / 'genq.db'}")
    port = free_port()
    env = genq_env(
        GENQ_DATA_DIR=str(data),
        GENQ_MODEL=model,
        GENQ_SWEEP_INTERVAL_S="1",
        GENQ_PROGRESS_INTERVAL_S="0.05",  # streamed text comes in several deltas
    )
    with api_and_worker(env, port, tmp_path) as (_, worker_log):
        yield {"base_url": f"http://127.0.0.1:{port}/v1", "model": model, "log": worker_log}


def chat_line(custom_id: str, model: str, **body: Any) -> str:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": MESSAGES, **body},
    }
    return json.dumps(line) + "\n"


def test_the_openai_sdk_chats_and_batches_chat_lines(genq: dict[str, Any]) -> None:
    model = genq["model"]
    client = OpenAI(base_url=genq["base_url"], api_key="unused", max_retries=0)

    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    assert reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content is not None
    assert choice.logprobs is not None and choice.logprobs.content
    assert len(choice.logprobs.content) <= 8
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert reply.usage is not None and reply.usage.completion_tokens <= 8

    structured = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
    )
    assert structured.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(structured.choices[0].message.content or ""), SCHEMA)

    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "x"}},
            },
        )
    assert bad.value.code == "invalid_schema"

    content = chat_line("greedy", model, max_tokens=6, temperature=0) + chat_line(
        "json",
        model,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
    )
    uploaded = client.files.create(file=("chat.jsonl", content.encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = poll(client, batch.id, genq["log"])
    assert done.status == "completed", done
    assert done.output_file_id
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in output] == ["greedy", "json"]
    bodies = [x["response"]["body"] for x in output]
    assert {b["object"] for b in bodies} == {"chat.completion"}
    # Greedy: the batch line says what the synchronous call said for the same tokens.
    assert reply.choices[0].message.content.startswith(  # type: ignore[union-attr]
        bodies[0]["choices"][0]["message"]["content"]
    )
    jsonschema.validate(json.loads(bodies[1]["choices"][0]["message"]["content"]), SCHEMA)


def test_the_openai_sdk_streams_chat_completions(genq: dict[str, Any]) -> None:
    model = genq["model"]
    client = OpenAI(base_url=genq["base_url"], api_key="unused", max_retries=0)
    asked: dict[str, Any] = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 120,
        "temperature": 0,
    }
    chunks = list(client.chat.completions.create(**asked, stream=True))
    whole = client.chat.completions.create(**asked)

    assert len({(c.id, c.created) for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert all(c.usage is None for c in chunks)  # not asked for
    first, *deltas, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == (
        whole.choices[0].message.content
    )
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices[0].delta.content is None
    size = len(whole.choices[0].message.content or "")
    print(f"\nstreamed {size} characters in {len(chunks)} chunks")
