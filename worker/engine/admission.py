"""Which waiting requests join the running batch at the next iteration.

FIFO, within the rows and cache tokens left; when the oldest waiting request does not
fit (a beam request waiting for ``num_beams`` rows), later ones that do fit go first, so
a short job is not held up behind it, until the oldest has been passed over
``MAX_PASSED_OVER`` times: then admission waits for it (no request starves).

The prompts admitted at one iteration hold at most ``PREFILL_TOKENS`` tokens (one
request at least): a prefill stops every running row for its whole forward, so newcomers
arriving in a burst are prefilled a slice per iteration, with decode steps between.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from worker.engine.requests import RequestState

# Waiting requests looked at per admission (tokenizing them is part of the cost).
ADMIT_SCAN = 256
# How often the oldest waiting request may be passed over by later, smaller ones.
MAX_PASSED_OVER = 64
# Prompt tokens prefilled per iteration (a few forwards of batching.PREFILL_GROUP_TOKENS;
# one request at least, however long its prompt): the running rows wait for this much
# prefill between two of their steps (about 1.3 s in bf16 and 2.6 s in fp32 for GPT-2
# 124M on 2 cores), and a burst of newcomers joins in few iterations.
PREFILL_TOKENS = 2048


def pick(
    waiting: deque[RequestState],
    room: tuple[int, int],
    tokenize: Callable[[RequestState], bool],
    *,
    eligible: Callable[[RequestState], bool] | None = None,
    prefill_tokens: int = PREFILL_TOKENS,
) -> list[RequestState]:
    """Remove from ``waiting`` and return the requests that fit in ``room`` (free rows,
    free cache tokens) and ``prefill_tokens``. ``tokenize`` sizes a request on first
    sight; a request it refuses (and resolves) is dropped from ``waiting``. With
    ``eligible``, only the requests it accepts are looked at (the others stay)."""
    rows, tokens = room
    chosen: list[RequestState] = []
    blocked: RequestState | None = None
    for state in list(waiting)[:ADMIT_SCAN]:
        if blocked is not None and blocked.passed_over >= MAX_PASSED_OVER:
            break
        if not state.tokenized and not tokenize(state):
            waiting.remove(state)
            continue
        if eligible is not None and not eligible(state):
            continue
        if chosen and len(state.prompt_ids) > prefill_tokens:
            break
        if state.n > rows or state.cost > tokens:
            blocked = blocked or state
            continue
        if blocked is not None:
            blocked.passed_over += 1
        waiting.remove(state)
        chosen.append(state)
        rows -= state.n
        tokens -= state.cost
        prefill_tokens -= len(state.prompt_ids)
    return chosen
