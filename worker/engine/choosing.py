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
from worker.engine.constrained import unpack_bitmask
from worker.engine.logprobs import position_logprobs
from worker.engine.requests import RequestState
from worker.engine.sampling import choose_tokens, greedy_argmax

log = logging.getLogger(__name__)

# A request and the rows of the batch (or of a prefill mini-batch) it owns.
Placed = list[tuple[RequestState, list[int]]]
# Beam reorders of one decode step: (a request's rows, the row each continues, how many
# of the newest cache columns its rows can differ in: the tokens it has fed since its
# prompt, whose keys and values all its rows share).
Moves = list[tuple[list[int], list[int], int]]


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
    prefill: a beam request's rows are then copies of one prompt).

    Constrained rows are masked first; log-probabilities come from the raw logits."""
    raw, logits = logits, constrain_rows(logits, placed)
    chosen = greedy_argmax(logits)
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
                    fed = len(state.beam.best_running) - 1  # the newest token is not fed yet
                    moves.append((rows, [rows[s] for s in state.beam.sources], fed))
            else:
                history = state.history(pad_id) if state.spec.needs_history else None
                chosen[index] = choose_tokens(logits[index], history, state.spec, state.generator)
        except Exception as exc:
            log.warning("request %s failed: %r", state.request.id, exc)
            state.error = error_of(exc)
    note_logprobs(raw, chosen, placed)
    return chosen


def constrain_rows(logits: torch.Tensor, placed: Placed) -> torch.Tensor:
    """``logits`` with each constrained row's disallowed tokens at ``-inf``.

    The same tensor when no row is constrained (free batches pay nothing). The masks
    of all constrained rows are filled into one bitmask and applied in one operation;
    a request whose matcher fails is failed alone, its rows left as they were.
    """
    constrained = [(s, r) for s, r in placed if s.constraint is not None and not s.done]
    if not constrained:
        return logits
    first = constrained[0][0].constraint
    assert first is not None
    rows = [row for _, r in constrained for row in r]
    bitmask = torch.zeros((len(rows), first.words), dtype=torch.int32)
    start = 0
    for state, state_rows in constrained:
        assert state.constraint is not None
        try:
            state.constraint.fill(bitmask, start)
        except GenerationError as exc:
            state.error = exc
            bitmask[start : start + len(state_rows)] = -1  # all allowed: the row is ignored
        start += len(state_rows)
    allowed = unpack_bitmask(bitmask, logits.shape[-1]).to(logits.device)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    masked = logits.clone()
    masked[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return masked


def note_logprobs(raw: torch.Tensor, chosen: torch.Tensor, placed: Placed) -> None:
    """Record the chosen tokens' log-probabilities for the requests that asked."""
    for state, rows in placed:
        if not state.wants_logprobs or state.done or state.beam is not None:
            continue
        index = torch.tensor(rows, dtype=torch.long, device=raw.device)
        top = state.request.params.top_logprobs
        for i, position in enumerate(position_logprobs(raw[index], chosen[index], top)):
            if state.reasons[i] is None:
                state.positions[i].append(position)


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
