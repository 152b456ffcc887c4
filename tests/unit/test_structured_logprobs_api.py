"""response_format and logprobs through the API: 422s naming the schema's problem,
logprobs stored with the result and returned in the job and OpenAI's shapes."""

# ruff: noqa: F811  (the fixtures imported from test_files_batches are parameters here)
from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.logprobs import completion_logprobs
from core.settings import Settings
from tests.unit.test_files_batches import (  # noqa: F401 (fixtures)
    api,
    content_lines,
    create,
    finalized,
    inline,
    jsonl,
    line,
    runtime,
    upload,
)

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "foo"}, "Invalid type: foo"),
        ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
        ({"type": "string", "pattern": "[a-z"}, "regex"),
        ({"$ref": "#/$defs/missing"}, "does not exist"),
    ],
)
def test_an_unsupported_schema_is_a_422_naming_the_problem(
    api: TestClient, inline: Any, schema: Any, problem: str
) -> None:
    body = {"prompt": "hi", "response_format": schema_format(schema)}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"].startswith("response_format")
    assert problem in error["message"]

    completion = {"model": "fake", "prompt": "hi", "response_format": schema_format(schema)}
    response = api.post("/v1/completions", json=completion)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_schema" and error["param"] == "response_format"
    assert problem in error["message"]
    assert inline.sent == []


def test_response_format_shapes_are_checked(api: TestClient) -> None:
    for bad in (
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": PERSON}},
    ):
        response = api.post("/v1/jobs", json={"prompt": "hi", "response_format": bad})
        assert response.status_code == 422, bad
        assert response.json()["error"]["param"].startswith("response_format")
    beams = {"prompt": "hi", "num_beams": 2, "response_format": {"type": "json_object"}}
    assert api.post("/v1/jobs", json=beams).status_code == 422
    assert api.post("/v1/jobs", json={"prompt": "hi", "top_logprobs": 2}).status_code == 422


def test_a_valid_response_format_is_stored_with_the_job(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"prompt": "hi", "response_format": schema_format(PERSON)})
    assert response.status_code == 202, response.text
    stored = response.json()["params"]["response_format"]
    assert stored == schema_format(PERSON)


def test_logprobs_are_stored_and_returned_by_get_job(api: TestClient) -> None:
    job = api.post(
        "/v1/jobs",
        json={"prompt": "one two three", "max_new_tokens": 2, "logprobs": True, "top_logprobs": 2},
    ).json()
    got = api.get(f"/v1/jobs/{job['id']}").json()
    assert got["status"] == "succeeded"
    (entries,) = got["logprobs"]
    assert [e["token"] for e in entries] == [" three", " two"]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    assert entries[0]["bytes"] == list(b" three")
    plain = api.post("/v1/jobs", json={"prompt": "one two", "max_new_tokens": 1}).json()
    assert api.get(f"/v1/jobs/{plain['id']}").json()["logprobs"] is None


def test_completions_and_batch_lines_carry_logprobs_in_openai_shape(
    api: TestClient, inline: Any, settings: Settings
) -> None:
    body = {"model": "fake", "prompt": "one two three", "max_tokens": 2, "logprobs": 1}
    completion = api.post("/v1/completions", json=body).json()
    logprobs = completion["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" three", " two"]
    assert logprobs["text_offset"] == [0, len(" three")]
    assert len(logprobs["token_logprobs"]) == 2
    pairs = zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True)
    assert all(token in top for token, top in pairs)
    assert api.post("/v1/completions", json={**body, "logprobs": 6}).status_code == 400

    batch = create(api, upload(api, jsonl(line("a", logprobs=0), line("b")))["id"])
    done = finalized(api, settings, batch["id"])
    output = content_lines(api, done["output_file_id"])
    first = output[0]["response"]["body"]["choices"][0]["logprobs"]
    assert first["tokens"] == [" three", " two", " one"]
    assert output[1]["response"]["body"]["choices"][0]["logprobs"] is None


def test_a_batch_line_with_a_bad_schema_is_named(
    api: TestClient, inline: Any, settings: Settings
) -> None:
    bad = line("x", response_format=schema_format({"type": "foo"}))
    batch = create(api, upload(api, jsonl(line("a"), bad))["id"])
    done = finalized(api, settings, batch["id"])
    assert done["status"] == "failed"
    (error,) = done["errors"]["data"]
    assert error["line"] == 2 and "Invalid type: foo" in error["message"]
    assert inline.sent == []


def test_completion_logprobs_shape_keeps_the_sampled_token() -> None:
    entry = {
        "token": "b",
        "logprob": -2.0,
        "bytes": [98],
        "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}],
    }
    shaped = completion_logprobs([entry, entry | {"token": "cd"}])
    assert shaped == {
        "tokens": ["b", "cd"],
        "token_logprobs": [-2.0, -2.0],
        "top_logprobs": [{"a": -0.5, "b": -2.0}, {"a": -0.5, "cd": -2.0}],
        "text_offset": [0, 1],
    }
    assert completion_logprobs(None) is None
