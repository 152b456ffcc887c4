"""core.openai_stream: what of a running job's text is safe to send, and the chunks
of successive snapshots (a job handed back to the queue included)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pytest

from core.openai_stream import DONE, ChunkStream, settled


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        (" once upon", [], " once upon"),
        (" once upon ", [], " once upon"),  # a space may fold into the next token
        (" caf\ufffd", [], " caf"),  # a character still being generated
        (" the end. More", ["."], " the end"),  # past a stop string: cut there
        (" the EN", ["END"], " the"),  # may be the start of a stop string
        (" the E", ["xyz", "END"], " the"),
        (" the ENDING", ["END", "the"], ""),
        (" the EX", ["END"], " the EX"),
    ],
)
def test_settled_text_is_what_the_final_text_begins_with(
    text: str, stops: list[str], expected: str
) -> None:
    assert settled(text, stops) == expected


@dataclasses.dataclass
class Snapshot:
    status: str
    outputs: list[str] | None
    id: str = "job_1"
    custom_id: str | None = None
    model: str = "m"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    finish_reasons: list[str] | None = None
    logprobs: list[Any] | None = None
    messages: list[Any] | None = None
    prompt_tokens: int | None = 2
    completion_tokens: int | None = 3
    error_code: str | None = None
    error_message: str | None = None
    created_at: dt.datetime = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    finished_at: dt.datetime | None = None


def payloads(events: list[str]) -> list[Any]:
    return [e if e == DONE else json.loads(e.removeprefix("data: ")) for e in events]


def test_deltas_add_up_to_the_final_text_through_a_stop_string() -> None:
    stream = ChunkStream(include_usage=False)
    params = {"stop": ["END"]}
    events = stream.start(Snapshot("running", [" a b E"], params=params))
    events += stream.update(Snapshot("running", [" a b ENDx"], params=params))
    final = Snapshot("succeeded", [" a b "], params=params, finish_reasons=["stop"])
    events += stream.update(final)
    chunks = payloads(events)
    assert chunks[-1] == DONE and stream.finished
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [" a b", " ", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_requeued_job_resumes_or_the_stream_says_it_diverged() -> None:
    stream = ChunkStream(include_usage=True)
    assert payloads(stream.start(Snapshot("running", [" one two"])))[0]["usage"] is None
    assert stream.update(Snapshot("queued", None)) == []  # handed back: nothing to undo
    assert stream.update(Snapshot("running", [" one"])) == []  # not yet past what was sent
    (error,) = payloads(stream.update(Snapshot("succeeded", [" three four"])))
    assert error["error"]["code"] == "stream_diverged" and stream.finished
