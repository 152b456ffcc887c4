"""Log-probabilities in OpenAI's two response shapes.

A job stores, per sequence, OpenAI's chat entries: ``{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}]}`` (worker/engine/logprobs.py makes
them). Chat answers ``{"content": entries, "refusal": null}``; completions answer the
legacy shape, ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class TopLogprob(BaseModel):
    """One of the likeliest tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A generated token, its log-probability and the likeliest alternatives."""

    top_logprobs: list[TopLogprob]


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's chat ``choices[i].logprobs`` for one sequence's entries."""
    if entries is None:
        return None
    return {"content": entries, "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's completions ``choices[i].logprobs`` for one sequence's entries.

    As OpenAI documents, each ``top_logprobs`` mapping also holds the sampled token,
    so it may have one more element than asked for; ``text_offset`` counts characters
    from the start of the completion text.
    """
    if entries is None:
        return None
    offsets: list[int] = []
    position = 0
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    tops = []
    for entry in entries:
        top = {t["token"]: t["logprob"] for t in entry["top_logprobs"]}
        top.setdefault(entry["token"], entry["logprob"])
        tops.append(top)
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def sequence(logprobs: list[Any] | None, index: int) -> list[dict[str, Any]] | None:
    """Sequence ``index``'s entries of a job's stored logprobs (None when not asked)."""
    if not logprobs or index >= len(logprobs):
        return None
    entries: list[dict[str, Any]] = logprobs[index]
    return entries
