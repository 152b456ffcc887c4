"""Per-token log-probabilities, as OpenAI and vLLM report them.

The log-probability of a token is the log-softmax of the model's *raw* logits at
that position (before temperature, top-k/top-p, penalties or a grammar mask), the
meaning vLLM gives ``logprobs`` by default and OpenAI documents: a score of the text
under the model, whatever the sampling did. ``top_logprobs`` are the likeliest
tokens at the same position, likeliest first.

Entries are stored as OpenAI's chat shape (``token``, ``logprob``, ``bytes``,
``top_logprobs``); the completions shape is derived from it (core/logprobs.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

# OpenAI reports a token with no probability at all as -9999.0 (JSON has no -inf).
FLOOR = -9999.0


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The chosen token of one position, its log-probability and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def position_logprobs(raw: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprob]:
    """One :class:`TokenLogprob` per row of ``raw`` (``[rows, vocab]`` raw logits)."""
    logprobs = torch.log_softmax(raw.float(), dim=-1)
    picked = logprobs.gather(1, chosen.view(-1, 1).to(logprobs.device)).squeeze(1).tolist()
    if top:
        values, indices = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        tops = [
            list(zip(i, v, strict=True))
            for i, v in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [[] for _ in picked]
    return [
        TokenLogprob(
            token_id=int(t), logprob=max(lp, FLOOR), top=[(i, max(v, FLOOR)) for i, v in tp]
        )
        for t, lp, tp in zip(chosen.tolist(), picked, tops, strict=True)
    ]


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    # One token decoded alone, as vLLM does: a token holding part of a multi-byte
    # character reads as U+FFFD; ``bytes`` says what the text really is where it can.
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def to_entries(
    tokenizer: Any, positions: list[TokenLogprob], eos_ids: frozenset[int]
) -> list[dict[str, Any]]:
    """A sequence's positions in OpenAI's chat shape; a final EOS (not text) is left out."""
    if positions and positions[-1].token_id in eos_ids:
        positions = positions[:-1]
    entries = []
    for position in positions:
        entry = _entry(tokenizer, position.token_id, position.logprob)
        entry["top_logprobs"] = [_entry(tokenizer, i, v) for i, v in position.top]
        entries.append(entry)
    return entries
