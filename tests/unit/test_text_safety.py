"""Text safety: every string a client sends is stored and returned exactly, or
refused with a 4xx naming the field, never a 500 (SQLite and PostgreSQL); batch
lines with per-line size, nesting and text errors; and the small 500s that were
(a deleted file's Idempotency-Key, non-ASCII file names, chunked bodies)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.app import create_app
from core import files, idempotency, keys, text
from core.db import session_scope
from core.models import IdempotencyRecord
from core.openai_format import MAX_LINE_BYTES, MAX_LINE_DEPTH, RequestError, parse_batch_line
from core.settings import Settings
from tests.conftest import RecordingQueue

# Every control character but NUL, a BOM, emoji, right-to-left, combining marks.
EXOTIC = "".join(chr(c) for c in range(1, 32)) + "\x7f\ufeff😀 שלום e\u0301 \u2028"


def raw_post(client: TestClient, path: str, body: str) -> Any:
    """POST a JSON document written by hand (json= would not write lone surrogates)."""
    return client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})


def test_exotic_but_storable_text_round_trips_exactly(client: TestClient) -> None:
    body = {"prompt": EXOTIC, "stop": [EXOTIC[:200]], "model": "fake"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["prompt"] == EXOTIC and job["params"]["stop"] == [EXOTIC[:200]]


@pytest.mark.parametrize("bad", ["\\u0000", "\\ud800", "\\udfff", "a\\ud83d"])
@pytest.mark.parametrize(
    ("path", "template", "param"),
    [
        ("/v1/jobs", '{{"prompt": "x{bad}y"}}', "prompt"),
        ("/v1/jobs", '{{"prompt": "x", "stop": ["ok", "s{bad}"]}}', "stop.1"),
        ("/v1/jobs", '{{"prompt": "x", "model": "m{bad}"}}', "model"),
        ("/v1/jobs/bulk", '{{"jobs": [{{"prompt": "a"}}, {{"prompt": "{bad}"}}]}}',
         "jobs.1.prompt"),
        ("/v1/completions", '{{"model": "fake", "prompt": "{bad}"}}', "prompt"),
        ("/v1/completions", '{{"model": "fake", "prompt": ["a", "{bad}"]}}', "prompt.1"),
        ("/v1/batches", '{{"input_file_id": "f", "metadata": {{"k": "{bad}"}}}}', "metadata.k"),
        ("/v1/batches", '{{"input_file_id": "f", "metadata": {{"{bad}": "v"}}}}', "metadata.<key>"),
        ("/v1/batches", '{{"input_file_id": "{bad}"}}', "input_file_id"),
    ],
)  # fmt: skip
def test_unstorable_text_is_a_422_naming_the_field(
    client: TestClient, path: str, template: str, param: str, bad: str
) -> None:
    response = raw_post(client, path, template.format(bad=bad))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_text"


@pytest.mark.parametrize(
    "content_type", [None, "APPLICATION/JSON", "application/vnd.x+json", "text/plain"]
)
def test_any_content_type_is_checked(client: TestClient, content_type: str | None) -> None:
    # FastAPI decodes +json types too (and, unless strict, a body with no type).
    headers = {"Content-Type": content_type} if content_type else {}
    nul_escape = b'{"prompt": "a' + b"\\" + b'u0000"}'
    response = client.post("/v1/jobs", content=nul_escape, headers=headers)
    assert 400 <= response.status_code < 500, response.text


def test_a_valid_surrogate_pair_is_fine(client: TestClient) -> None:
    response = raw_post(client, "/v1/jobs", '{"prompt": "smile \\ud83d\\ude00"}')
    assert response.status_code == 202 and response.json()["prompt"] == "smile 😀"
    # An escaped backslash before u0000 is the text "\u0000", not a NUL.
    literal = raw_post(client, "/v1/jobs", '{"prompt": "\\\\u0000"}')
    assert literal.status_code == 202 and literal.json()["prompt"] == "\\u0000"


@pytest.mark.parametrize(
    ("url", "param"),
    [("/v1/jobs/job_%00x", "path"), ("/v1/jobs?after=%00", "after"),
     ("/v1/jobs?batch_id=a%00", "batch_id"), ("/v1/files/file-%00", "path"),
     ("/v1/batches?after=x%00", "after")],
)  # fmt: skip
def test_nul_in_the_path_or_query_is_a_422(client: TestClient, url: str, param: str) -> None:
    response = client.get(url)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def upload(client: TestClient, content: bytes, name: str = "in.jsonl", **headers: str) -> Any:
    return client.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": "batch"}, headers=headers
    )


def line(custom_id: str, prompt: str = "hello") -> bytes:
    body = {"model": "fake", "prompt": prompt, "max_tokens": 2}
    request = {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}
    return json.dumps(request).encode()


def test_file_names_are_kept_exactly_and_served_per_rfc_6266(client: TestClient) -> None:
    for name in ("данные.jsonl", "日本語 😀;x=y.jsonl", "back\\slash.jsonl"):
        made = upload(client, line("a") + b"\n", name=name)
        assert made.status_code == 200, made.text
        assert made.json()["filename"] == name
        content = client.get(f"/v1/files/{made.json()['id']}/content")
        assert content.status_code == 200 and content.content == line("a") + b"\n"
        disposition = content.headers["content-disposition"]
        assert disposition.isascii()
        encoded = disposition.split("filename*=UTF-8''", 1)[1]
        assert unquote(encoded) == name
    # httpx would percent-encode a NUL in a file name; a hostile client need not.
    nul = client.post(
        "/v1/files",
        content=multipart({"purpose": (None, b"batch"), "file": ("a\x00b.jsonl", line("a"))}),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert nul.status_code == 422, nul.text
    assert nul.json()["error"]["param"] == "file"


BOUNDARY = "b0undary"


def multipart(parts: dict[str, tuple[str | None, bytes]]) -> bytes:
    """A multipart/form-data body written byte for byte."""
    out = b""
    for field, (filename, data) in parts.items():
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def batch_errors(client: TestClient, content: bytes) -> list[dict[str, Any]]:
    file_id = upload(client, content).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id}).json()
    assert batch["status"] == "failed", batch
    errors: list[dict[str, Any]] = batch["errors"]["data"]
    return errors


def test_batch_lines_get_per_line_size_nesting_and_text_errors(client: TestClient) -> None:
    deep = b'{"custom_id": "d", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    shallow_but_over = b'{"custom_id": "s", "x": ' + b"[" * 40 + b"]" * 40 + b"}"
    huge = b'{"custom_id": "h", "x": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}'
    nul = line("n", "a\x00b")
    content = b"\n".join([line("ok"), deep, shallow_but_over, huge, nul, line("ok2")])
    errors = {e["line"]: e for e in batch_errors(client, content)}
    assert errors[2]["code"] == "line_too_deep" and errors[3]["code"] == "line_too_deep"
    assert str(MAX_LINE_DEPTH) in errors[3]["message"]
    assert errors[4]["code"] == "line_too_large"
    assert errors[5]["code"] == "invalid_text" and errors[5]["param"] == "body.prompt"
    assert set(errors) == {2, 3, 4, 5}


def test_bounded_lines_drop_an_oversized_line_as_it_streams() -> None:
    chunks = [b"ab\nc", b"d" * 10, b"e\nfg", b"\n", b"h" * 20]
    got = list(files.iter_bounded_lines(chunks, 8))
    assert got == [(1, b"ab"), (2, None), (3, b"fg"), (4, None)]
    assert list(files.iter_bounded_lines([b"a\n", b"b"], 8)) == [(1, b"a"), (2, b"b")]


def test_reupload_with_the_key_of_a_deleted_file_makes_a_new_file(client: TestClient) -> None:
    first = upload(client, line("a"), **{"Idempotency-Key": "up-1"}).json()
    again = upload(client, line("a"), **{"Idempotency-Key": "up-1"}).json()
    assert again["id"] == first["id"]
    assert client.delete(f"/v1/files/{first['id']}").status_code == 200
    after = upload(client, line("a"), **{"Idempotency-Key": "up-1"})
    assert after.status_code == 200, after.text
    assert after.json()["id"] != first["id"]
    replay = upload(client, line("a"), **{"Idempotency-Key": "up-1"}).json()
    assert replay["id"] == after.json()["id"]


@pytest.fixture
def small_client(settings: Settings) -> Iterator[TestClient]:
    small = settings.model_copy(update={"max_body_bytes": 2048, "max_file_bytes": 2048})
    with TestClient(create_app(small, queue=RecordingQueue())) as client:
        yield client


def chunked(data: bytes) -> Iterator[bytes]:
    """A body with no Content-Length: sent chunked."""
    for start in range(0, len(data), 512):
        yield data[start : start + 512]


def test_an_oversized_chunked_body_is_a_413(small_client: TestClient) -> None:
    big_json = json.dumps({"prompt": "x" * 10_000}).encode()
    response = small_client.post(
        "/v1/jobs", content=chunked(big_json), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    form = multipart({"purpose": (None, b"batch"), "file": ("f.jsonl", b"x" * 200_000)})
    upload = small_client.post(
        "/v1/files",
        content=chunked(form),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert upload.status_code == 413, upload.text
    assert upload.json()["error"]["code"] == "request_too_large"


def test_key_names_and_owners_must_be_storable(settings: Settings) -> None:
    with session_scope(settings.resolved_database_url) as session:
        for name, owner, param in (("a\x00", None, "name"), ("ok", "o\ud800", "owner"),
                                   ("x" * 256, None, "name")):  # fmt: skip
            with pytest.raises(text.UnstorableTextError) as caught:
                keys.create_key(session, name=name, owner=owner)
            assert caught.value.param == param
        key, _ = keys.create_key(session, name=EXOTIC[:100])
        assert key.name == EXOTIC[:100]


def test_idempotency_records_are_purged_with_retention(
    client: TestClient, settings: Settings
) -> None:
    client.post("/v1/jobs", json={"prompt": "a"}, headers={"Idempotency-Key": "k-old"})
    client.post("/v1/jobs", json={"prompt": "b"}, headers={"Idempotency-Key": "k-new"})
    url = settings.resolved_database_url
    with session_scope(url) as session:
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
        session.execute(
            update(IdempotencyRecord).where(IdempotencyRecord.key == "k-old").values(created_at=old)
        )
    with session_scope(url) as session:
        assert idempotency.purge(session, older_than_days=30) == 1
    with session_scope(url) as session:
        assert list(session.scalars(select(IdempotencyRecord.key))) == ["k-new"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_nul_in_a_utf16_or_utf32_body_is_a_422(client: TestClient, encoding: str) -> None:
    """JSON decoders accept UTF-16/32 bodies; the NUL check must see through them."""
    body = json.dumps({"prompt": "a\u0000b"}).encode(encoding)
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_a_surrogate_sent_as_raw_utf8_bytes_is_refused_like_its_escape(
    client: TestClient,
) -> None:
    # Not UTF-8, but json.loads decodes bytes with "surrogatepass": the fast pre-check
    # that lets a body skip the walk must see these bytes as well as the \ud800 escape.
    surrogate = b"\xed\xa0\x80"
    body = b'{"prompt": "hi", "response_format": {"type": "json_object", "x' + surrogate + b'": 1}}'
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_text"
    batch_line = (
        b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": '
        b'{"model": "fake", "prompt": "x' + surrogate + b'"}}'
    )
    with pytest.raises(RequestError) as refused:
        parse_batch_line(batch_line, endpoint="/v1/completions", models=["fake"])
    assert (refused.value.code, refused.value.param) == ("invalid_text", "body.prompt")
