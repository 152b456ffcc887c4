"""Which waiting requests join the running batch at the next iteration.

FIFO, within the rows and cache tokens left; when the oldest waiting request does not
fit (a beam request waiting for ``num_beams`` rows), later ones that do fit go first, so
a short job is not held up behind it, until the oldest has been passed over
``MAX_PASSED_OVER`` times: then admission waits for it (no request starves).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from worker.engine.requests import RequestState

# Waiting requests looked at per admission (tokenizing them is part of the cost).
ADMIT_SCAN = 256
# How often the oldest waiting request may be passed over by later, smaller ones.
MAX_PASSED_OVER = 64


def pick(
    waiting: deque[RequestState],
    room: tuple[int, int],
    tokenize: Callable[[RequestState], bool],
) -> list[RequestState]:
    """Remove from ``waiting`` and return the requests that fit in ``room`` (free rows,
    free cache tokens). ``tokenize`` sizes a request on first sight; a request it
    refuses (and resolves) is dropped from ``waiting``."""
    rows, tokens = room
    chosen: list[RequestState] = []
    blocked: RequestState | None = None
    for state in list(waiting)[:ADMIT_SCAN]:
        if blocked is not None and blocked.passed_over >= MAX_PASSED_OVER:
            break
        if not state.tokenized and not tokenize(state):
            waiting.remove(state)
            continue
        if state.n > rows or state.cost > tokens:
            blocked = blocked or state
            continue
        if blocked is not None:
            blocked.passed_over += 1
        waiting.remove(state)
        chosen.append(state)
        rows -= state.n
        tokens -= state.cost
    return chosen
