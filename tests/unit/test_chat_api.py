"""Chat through the API (fake engine, whose template is one "role: content" line per
message): /v1/chat/completions, messages on jobs and bulk, chat lines in batches."""

# ruff: noqa: F811  (the fixtures imported from test_files_batches are parameters here)
from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from core import workers
from core.db import session_scope
from core.settings import Settings
from tests.unit.test_files_batches import (  # noqa: F401 (fixtures)
    api,
    content_lines,
    finalized,
    inline,
    jsonl,
    runtime,
    upload,
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "one two"}]},
]
RENDERED = "system: Be brief.\nuser: one two\nassistant:"


def chat(api: TestClient, **body: Any) -> Any:
    return api.post(
        "/v1/chat/completions",
        json={"model": "fake", "messages": MESSAGES, "max_tokens": 3, **body},
    )


def test_chat_completion_answers_in_openai_shape(api: TestClient) -> None:
    response = chat(api, logprobs=True, top_logprobs=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    # The fake model reverses the rendered prompt's words.
    assert choice["message"] == {
        "role": "assistant",
        "content": " assistant: two one",
        "refusal": None,
    }
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [" assistant:", " two", " one"]
    assert all(len(c["top_logprobs"]) == 1 for c in content)
    job = api.get(f"/v1/jobs/{body['id'].removeprefix('chatcmpl-')}").json()
    assert job["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one two"},
    ]
    assert job["prompt"] == RENDERED


def test_chat_requests_are_checked_field_by_field(api: TestClient, inline: Any) -> None:
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"usage": True}}, "stream_options.usage"),
    ]
    for body, param in cases:
        response = chat(api, **body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, response.text
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}}
    response = chat(api, response_format=bad_schema)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_schema"
    assert inline.sent == []


def test_a_model_without_a_chat_template_is_a_422_naming_it(
    api: TestClient, settings: Settings, inline: Any
) -> None:
    with session_scope(settings.resolved_database_url) as session:
        workers.heartbeat(
            session, name="w-plain", model="plain", queues=["q"], in_flight=0, tokens_generated=0
        )
    response = chat(api, model="plain")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_without_chat_template" and "'plain'" in error["message"]
    job = api.post("/v1/jobs", json={"model": "plain", "messages": MESSAGES})
    assert job.status_code == 422 and job.json()["error"]["param"] == "model"
    bulk = api.post(
        "/v1/jobs/bulk",
        json={"jobs": [{"prompt": "hi"}, {"model": "plain", "messages": MESSAGES}]},
    )
    assert bulk.status_code == 422 and bulk.json()["error"]["param"] == "jobs.1.model"
    assert inline.sent == []


def test_messages_on_jobs_and_bulk(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"messages": MESSAGES, "max_new_tokens": 2})
    assert response.status_code == 202, response.text
    done = api.get(f"/v1/jobs/{response.json()['id']}").json()
    assert done["status"] == "succeeded" and done["output"] == " assistant: two"
    assert done["prompt"] == RENDERED
    both = api.post("/v1/jobs", json={"messages": MESSAGES, "prompt": "x"})
    assert both.status_code == 422 and both.json()["error"]["param"] == "prompt"
    neither = api.post("/v1/jobs", json={"max_new_tokens": 2})
    assert neither.status_code == 422 and neither.json()["error"]["param"] == "prompt"
    bulk = api.post(
        "/v1/jobs/bulk",
        json={"jobs": [{"prompt": "a b", "max_new_tokens": 1}, {"messages": MESSAGES}]},
    )
    assert bulk.status_code == 202, bulk.text
    jobs = bulk.json()["data"]
    assert jobs[0]["messages"] is None and jobs[1]["messages"][1]["content"] == "one two"


def test_a_batch_of_chat_lines_gives_chat_completion_lines(
    api: TestClient, settings: Settings
) -> None:
    def chat_line(custom_id: str, **body: Any) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "fake", "messages": MESSAGES, "max_tokens": 2, **body},
        }

    file = upload(api, jsonl(chat_line("a"), chat_line("b", logprobs=True)))
    batch = api.post(
        "/v1/batches",
        json={
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ).json()
    done = finalized(api, settings, batch["id"])
    assert done["status"] == "completed", done
    output = content_lines(api, done["output_file_id"])
    bodies = [line["response"]["body"] for line in output]
    assert [b["object"] for b in bodies] == ["chat.completion"] * 2
    assert bodies[0]["choices"][0]["message"]["content"] == " assistant: two"
    assert bodies[0]["choices"][0]["logprobs"] is None
    assert bodies[1]["choices"][0]["logprobs"]["content"][0]["token"] == " assistant:"

    wrong = upload(api, jsonl(chat_line("a")))
    mismatch = api.post(
        "/v1/batches",
        json={
            "input_file_id": wrong["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    ).json()
    assert mismatch["status"] == "failed"
    assert "not this batch's endpoint" in json.dumps(mismatch["errors"])
