"""Hostile text, files and bodies against a running genq on PostgreSQL: every
string field with NUL or a lone surrogate is a 4xx naming it (never a 5xx), exotic
but storable text round-trips exactly, batch files with monster lines fail those
lines only, and the old small 500s answer properly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from core.openai_format import MAX_LINE_BYTES
from tests.security.conftest import Stack

BAD = ["\\u0000", "\\ud800", "\\udfff"]
FIELDS = [
    ("/v1/jobs", '{{"prompt": "a{bad}"}}', "prompt"),
    ("/v1/jobs", '{{"prompt": "a", "stop": ["{bad}"]}}', "stop.0"),
    ("/v1/jobs", '{{"prompt": "a", "model": "{bad}"}}', "model"),
    ("/v1/jobs/bulk", '{{"jobs": [{{"prompt": "{bad}"}}]}}', "jobs.0.prompt"),
    ("/v1/completions", '{{"model": "fake", "prompt": "{bad}"}}', "prompt"),
    ("/v1/completions", '{{"model": "fake", "prompt": "a", "stop": "{bad}"}}', "stop"),
    ("/v1/completions", '{{"model": "{bad}", "prompt": "a"}}', "model"),
    ("/v1/completions", '{{"model": "fake", "prompt": "a", "user": "{bad}"}}', "user"),
    ("/v1/batches", '{{"input_file_id": "{bad}"}}', "input_file_id"),
    ("/v1/batches", '{{"input_file_id": "f", "metadata": {{"a": "{bad}"}}}}', "metadata.a"),
    ("/v1/batches", '{{"input_file_id": "f", "metadata": {{"{bad}": "a"}}}}', "metadata.<key>"),
]


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(stack.key("hostile")) as c:
        yield c


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(("path", "template", "param"), FIELDS)
def test_unstorable_text_in_any_field_is_a_422_naming_it(
    client: httpx.Client, path: str, template: str, param: str, bad: str
) -> None:
    response = client.post(
        path,
        content=template.format(bad=bad).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "url", ["/v1/jobs/%00", "/v1/jobs?after=%00", "/v1/files/%00/content", "/v1/batches/%00"]
)
def test_nul_in_paths_and_queries_is_a_422(client: httpx.Client, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 422, response.text


def test_control_characters_round_trip_exactly(client: httpx.Client) -> None:
    prompt = "".join(chr(c) for c in range(1, 32)) + "\x7f\u2028\ufeff😀 e\u0301"
    made = client.post("/v1/jobs", json={"prompt": prompt, "stop": ["\x1b[0m"]})
    assert made.status_code == 202, made.text
    job = client.get(f"/v1/jobs/{made.json()['id']}").json()
    assert job["prompt"] == prompt and job["params"]["stop"] == ["\x1b[0m"]


def upload(client: httpx.Client, content: bytes, name: str = "in.jsonl", **headers: str) -> Any:
    return client.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": "batch"}, headers=headers
    )


def good_line(custom_id: str) -> bytes:
    body = {"model": "fake", "prompt": "a b", "max_tokens": 2}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}
    return json.dumps(line).encode()


def test_monster_batch_lines_fail_alone_and_the_api_stays_up(client: httpx.Client) -> None:
    lines = [
        good_line("a"),
        b'{"custom_id": "deep", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"custom_id": "wide", "x": [' + b"[]," * (MAX_LINE_BYTES // 3) + b"[]]}",
        good_line("b\x00"),
        good_line("c"),
    ]
    file_id = upload(client, b"\n".join(lines)).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id})
    assert batch.status_code == 200, batch.text
    errors = {e["line"]: e["code"] for e in batch.json()["errors"]["data"]}
    assert errors == {2: "line_too_deep", 3: "line_too_large", 4: "invalid_text"}
    assert client.get("/healthz").status_code == 200


def test_the_old_small_500s(stack: Stack, client: httpx.Client) -> None:
    # A non-ASCII file name downloads with RFC 6266 filename*.
    made = upload(client, good_line("a"), name="данные.jsonl").json()
    content = client.get(f"/v1/files/{made['id']}/content")
    assert content.status_code == 200
    encoded = content.headers["content-disposition"].split("filename*=UTF-8''")[1]
    assert unquote(encoded) == "данные.jsonl"
    # Re-uploading with the Idempotency-Key of a deleted file makes a new file.
    key = {"Idempotency-Key": "reupload-1"}
    first = upload(client, good_line("a"), **key).json()
    client.delete(f"/v1/files/{first['id']}")
    again = upload(client, good_line("a"), **key)
    assert again.status_code == 200 and again.json()["id"] != first["id"]
    # A chunked body over the limit (GENQ_MAX_BODY_BYTES, 64 KiB here) is a 413.
    big = json.dumps({"prompt": "x" * 100_000}).encode()
    chunks = (big[i : i + 4096] for i in range(0, len(big), 4096))
    response = client.post("/v1/jobs", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
