"""Beam search, run with transformers' own ``generate`` outside the shared batch.

Beams reorder their cache every step, so they cannot share the continuous batch;
the scheduler runs one such request at a time between decode steps.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from worker.engine.base import FinishReason, GenerationResult
from worker.engine.requests import RequestState, cut_at_stop, strip_prefix


class _AbortCriteria(StoppingCriteria):
    """Ends generate when the request is aborted; also records progress."""

    def __init__(self, state: RequestState, prompt_len: int) -> None:
        self.state = state
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        # Progress shows the best-scoring running beam so far.
        self.state.tokens = [input_ids[0, self.prompt_len :].tolist()]
        return torch.full(
            (input_ids.shape[0],), self.state.aborted, dtype=torch.bool, device=input_ids.device
        )


def run_beam_search(
    state: RequestState, model: Any, tokenizer: Any, eos_ids: frozenset[int], device: torch.device
) -> GenerationResult:
    """Generate ``state``'s request with ``model.generate`` and build its result."""
    params = state.request.params
    prompt_len = len(state.prompt_ids)
    input_ids = torch.tensor([state.prompt_ids], dtype=torch.long, device=device)
    if params.do_sample:
        # generate draws from the global generator; beam sampling is rare enough
        # that seeding it here (on the scheduler thread) is acceptable.
        torch.manual_seed(state.request.seed)
    state.start(None)
    sequences = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=state.max_new,
        num_beams=params.num_beams,
        early_stopping=params.early_stopping,
        num_return_sequences=params.num_return_sequences,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos_ids) or None,
        stop_strings=params.stop or None,
        tokenizer=tokenizer if params.stop else None,
        stopping_criteria=StoppingCriteriaList([_AbortCriteria(state, prompt_len)]),
    )
    outputs: list[str] = []
    reasons: list[FinishReason] = []
    tokens: list[list[int]] = []
    for row in sequences[:, prompt_len:].tolist():
        reason: FinishReason = "length"
        for i, token in enumerate(row):
            if token in eos_ids:
                row, reason = row[: i + 1], "eos"
                break
        else:
            # Shorter beams are padded after their end; pad == eos is handled above.
            while row and row[-1] == tokenizer.pad_token_id:
                row = row[:-1]
        full = tokenizer.decode(state.prompt_ids + row, skip_special_tokens=True)
        text, stopped = cut_at_stop(strip_prefix(full, state.prompt_text), params.stop)
        outputs.append(text)
        reasons.append("stop" if stopped else reason)
        tokens.append(row)
    state.tokens = tokens
    return GenerationResult(
        outputs=outputs,
        finish_reasons=reasons,
        prompt_tokens=prompt_len,
        completion_tokens=sum(len(t) for t in tokens),
        aborted=state.aborted,
    )
