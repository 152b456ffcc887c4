"""Choosing the next tokens of a step, request by request, each failing alone.

One argmax serves every plain greedy row; a sampled request draws from its own
generator, a beam request scores its own beams (:class:`~worker.engine.beam.BeamSearch`).
An exception here (non-finite scores, a stop-string check) belongs to the request it
was raised for: it is stored on that request, and the other rows keep their tokens.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from worker.engine.base import GenerationError
from worker.engine.requests import RequestState
from worker.engine.sampling import choose_tokens

log = logging.getLogger(__name__)

# A request and the rows of the batch (or of a prefill mini-batch) it owns.
Placed = list[tuple[RequestState, list[int]]]
# Beam reorders of one decode step: (a request's rows, the row each continues).
Moves = list[tuple[list[int], list[int]]]


def placed_consecutively(states: list[RequestState]) -> Placed:
    """The rows of a prefill mini-batch: each request's ``n`` rows, one after another."""
    placed: Placed = []
    start = 0
    for state in states:
        placed.append((state, list(range(start, start + state.n))))
        start += state.n
    return placed


def is_memory_error(exc: BaseException) -> bool:
    """Out of memory, on any device (the CPU allocator raises a plain RuntimeError)."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def error_of(exc: BaseException) -> GenerationError:
    """The error stored on a request for an exception that is its own."""
    if isinstance(exc, GenerationError):
        return exc
    if isinstance(exc, FloatingPointError):
        return GenerationError("non_finite_scores", f"the scores are not finite: {exc}")
    return GenerationError("generation_failed", f"generation failed: {exc!r}")


def choose(
    logits: torch.Tensor, placed: Placed, pad_id: int, moves: Moves | None = None
) -> torch.Tensor:
    """Next tokens for every row: one argmax for the batch, then per request; a
    request that fails here fails alone. Beam reorders go to ``moves`` (none after a
    prefill: a beam request's rows are then copies of one prompt)."""
    chosen = torch.argmax(logits, dim=-1)
    # argmax picks a NaN when a row has one: checking the chosen logits finds NaN rows
    # without another pass over the vocabulary.
    nan_rows = logits.gather(1, chosen[:, None]).isnan().flatten().tolist()
    for state, rows in placed:
        try:
            if any(nan_rows[row] for row in rows):
                raise FloatingPointError("the model's logits hold NaN")
            if state.beam is None and state.spec.plain_greedy:
                continue
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            if state.beam is not None:
                tokens = state.beam.step(logits[index])
                chosen[index] = torch.tensor(tokens, dtype=torch.long, device=logits.device)
                state.tokens = [list(state.beam.best_running)]
                if moves is not None:
                    moves.append((rows, [rows[s] for s in state.beam.sources]))
            else:
                history = state.history(pad_id) if state.spec.needs_history else None
                chosen[index] = choose_tokens(logits[index], history, state.spec, state.generator)
        except Exception as exc:
            log.warning("request %s failed: %r", state.request.id, exc)
            state.error = error_of(exc)
    return chosen


def record(chosen: torch.Tensor, placed: Placed, eos_ids: frozenset[int], tokenizer: Any) -> None:
    """Give each greedy or sampled row its token and decide whether it is finished
    (beam requests keep their own tokens)."""
    tokens = chosen.tolist()
    for state, rows in placed:
        if state.beam is not None or state.error is not None:
            continue
        try:
            for i, row in enumerate(rows):
                state.add_token(i, tokens[row], eos_ids, tokenizer)
        except Exception as exc:  # a stop-string check: this request's own
            log.warning("request %s failed: %r", state.request.id, exc)
            state.error = error_of(exc)
