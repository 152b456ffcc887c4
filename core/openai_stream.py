"""OpenAI's streamed completions (``stream: true``): a job's snapshots as chunks.

The worker stores a running job's partial text (its first sequence) every
``GENQ_PROGRESS_INTERVAL_S``; the API follows the row (api/streaming.py) and
:class:`ChunkStream` turns each snapshot into OpenAI's ``data: {json}`` chunks:

- text deltas of sequence 0 as its stored text grows, holding back what the final
  text may still change (:func:`settled`); then, once the job succeeded, the rest
  of the final text, so that the deltas of a choice concatenate to exactly the
  text the same request answers without ``stream``;
- the other choices (``n`` > 1), and every choice of a beam search or of a request
  for logprobs, arrive whole at the end, one chunk each with its logprobs: the
  stored progress has neither the other sequences, nor logprobs, and a beam's best
  sequence may change;
- a chunk with ``finish_reason`` per choice (empty text, or for chat an empty
  ``delta``), the usage chunk (``choices: []``) when ``stream_options.include_usage``
  asked for it, and ``data: [DONE]``.

A job that fails, is cancelled or deleted, or outlasts the stream (or a read of it
that fails) ends the stream with an ``{"error": {...}}`` chunk and no ``[DONE]``
(OpenAI's SDK raises ``APIError``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

from core.openai_format import (
    JobLike,
    chat_completion_object,
    completion_object,
    error_object,
    unix,
)

DONE = "data: [DONE]\n\n"

# Trailing whitespace and U+FFFD (bytes of a character still being generated): the
# next token may decode them differently (tokenizers fold spaces into punctuation).
_UNSETTLED_TAIL = re.compile(r"[\s\ufffd]+\Z")


class StreamedJob(JobLike, Protocol):
    """The columns of a job row a stream reads."""

    params: dict[str, Any]


def data(payload: dict[str, Any]) -> str:
    """One unnamed server-sent event, as OpenAI streams them."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def settled(text: str, stops: Sequence[str]) -> str:
    """The part of a running job's text that its final text is sure to begin with.

    The final text is cut before the first stop string, so what follows one is
    dropped, and so is a tail that may be the beginning of one; trailing whitespace
    and undecoded bytes wait for the next token.
    """
    for stop in stops:
        found = text.find(stop)
        if found >= 0:
            text = text[:found]
    held = 0  # the longest tail that is the beginning of a stop string
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return _UNSETTLED_TAIL.sub("", text[: len(text) - held])


class ChunkStream:
    """Turns successive snapshots of a completion job into OpenAI's chunks (SSE
    text), as :class:`api.streaming.Follower` asks."""

    def __init__(self, *, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.finished = False
        self.sent = ""  # the text of choice 0 sent so far
        self.job_id = ""
        self.chat = False
        self.incremental = True
        self.stops: list[str] = []
        self._head: dict[str, Any] = {}

    def start(self, first: StreamedJob) -> list[str]:
        """The opening chunks (for chat, each choice's role), then the text so far."""
        self.job_id = first.id
        self.chat = first.messages is not None
        params = first.params
        self.stops = list(params.get("stop") or [])
        self.incremental = (params.get("num_beams") or 1) == 1 and not params.get("logprobs")
        self._head = {
            "id": f"{'chatcmpl' if self.chat else 'cmpl'}-{first.id}",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": unix(first.created_at),
            "model": first.model,
        }
        opening = []
        if self.chat:
            for index in range(params.get("num_return_sequences") or 1):
                role = {"index": index, "delta": {"role": "assistant", "content": ""}}
                opening.append(self._chunk([{**role, "logprobs": None, "finish_reason": None}]))
        return opening + self.update(first)

    def update(self, job: StreamedJob) -> list[str]:
        """The chunks that take the client from the last snapshot to ``job``."""
        if job.status == "succeeded":
            return self._final(job)
        if job.status == "failed":
            code = job.error_code or "internal_error"
            return self._error(code, job.error_message or "generation failed")
        if job.status == "cancelled":
            return self._error("cancelled", f"job {job.id} was cancelled")
        if not self.incremental:
            return []
        text = settled((job.outputs or [""])[0], self.stops)
        # A job handed back to the queue starts its text again: wait until it is
        # past what was sent (a seeded or greedy run says the same again).
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return []
        delta, self.sent = text[len(self.sent) :], text
        return [self._chunk([self._choice(0, delta)])]

    def missing(self) -> list[str]:
        return self._error("not_found", f"job {self.job_id} was deleted")

    def timeout(self, last: StreamedJob) -> list[str]:
        return self._error(
            "timeout",
            f"job {self.job_id} did not finish within the stream's limit "
            f"(GENQ_COMPLETION_WAIT_S); it goes on: read it at /v1/jobs/{self.job_id}",
        )

    def failed(self) -> list[str]:
        return self._error(
            "internal_error",
            f"the stream could not read job {self.job_id}; it goes on: "
            f"read it at /v1/jobs/{self.job_id}",
        )

    def _final(self, job: StreamedJob) -> list[str]:
        # Only the first snapshot has the messages (they tell chat from completion).
        answer = chat_completion_object(job) if self.chat else completion_object(job)
        texts = [c["message"]["content"] if self.chat else c["text"] for c in answer["choices"]]
        if self.incremental and not texts[0].startswith(self.sent):
            return self._error(
                "stream_diverged",
                f"job {job.id} was run again after its worker was lost and its text differs "
                f"from what was streamed: read the whole result at /v1/jobs/{job.id}",
            )
        chunks = []
        for choice, text in zip(answer["choices"], texts, strict=True):
            index, logprobs = choice["index"], choice["logprobs"]
            rest = text[len(self.sent) :] if index == 0 and self.incremental else text
            if rest or not self.incremental:
                chunks.append(self._chunk([self._choice(index, rest, logprobs)]))
            finish = self._choice(index, None, finish_reason=choice["finish_reason"])
            chunks.append(self._chunk([finish]))
        if self.include_usage:
            chunks.append(data({**self._head, "choices": [], "usage": answer["usage"]}))
        self.finished = True
        return [*chunks, DONE]

    def _error(self, code: str, message: str) -> list[str]:
        self.finished = True
        return [data({"error": error_object(code, message)})]

    def _choice(
        self,
        index: int,
        text: str | None,
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        """One choice of a chunk; ``text`` None: the closing one (nothing more)."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return {
            "index": index,
            "text": text or "",
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> str:
        chunk = {**self._head, "choices": choices}
        if self.include_usage:  # as OpenAI does: null on every chunk but the last
            chunk["usage"] = None
        return data(chunk)
