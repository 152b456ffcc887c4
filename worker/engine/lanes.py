"""The engine's running batches: the main lane, and an express lane for short requests.

Every row of a running batch gets one token per decode step, and a step costs what all
its rows cost: a 4-token greedy job sharing steps with 60 beam rows would take four of
their steps, ten times its time alone. So short requests (:func:`express`; not bulk
work: a batch's short lines share the main steps at full throughput) run in a lane of
their own: a small slot cache that gets a turn before each of the main batch's forwards
(prefill or decode step). A turn admits the short requests waiting and runs up to
``EXPRESS_STEPS_PER_TURN`` of their steps: a 4-token job is done in one turn; a 16-token
job takes four turns instead of sixteen main steps. A short request that arrives during a
forward of the main batch (a decode step, GPT-2 and Llama's fast ones or the model's own,
or a prefill of up to ``PREFILL_GROUP_TOKENS``) does not wait for it to end: it gets a
turn between two of the model's layers, once a forward (a short request arriving after
that turn waits for the forward's end; :mod:`worker.engine.layerhooks`). The main batch
waits meanwhile, at most that many small steps twice per forward, however many short
requests arrive; short requests beyond the lane's rows join the main batch. With nothing
short waiting the main batch runs as before.
"""

from __future__ import annotations

import dataclasses

from core.express import EXPRESS_MAX_TOKENS, EXPRESS_ROWS
from worker.engine.fastpath import DecodeStep
from worker.engine.kvcache import SlotCache
from worker.engine.requests import RequestState

# Rows in the express lane (EXPRESS_ROWS: a request needing more, beams, runs in the
# main lane) and the most cache tokens of an express request (EXPRESS_MAX_TOKENS) are
# core.express's, which the API's express queue shares.
# Express steps per turn (one turn before each forward of the main batch, and one more
# inside it, between two layers, when a short request arrived during it).
EXPRESS_STEPS_PER_TURN = 4


@dataclasses.dataclass(eq=False)
class Lane:
    """A running batch: its slot cache, its requests in admission order, their rows
    of the cache, and the model's fast decode step bound to that cache (None: the
    model's own forward)."""

    batch: SlotCache
    fast: DecodeStep | None
    jobs: list[RequestState] = dataclasses.field(default_factory=list)
    slots: dict[RequestState, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows the lane's requests hold."""
        return sum(state.n for state in self.jobs)

    @property
    def tokens(self) -> int:
        """Cache tokens the lane's requests may hold."""
        return sum(state.cost for state in self.jobs)


def express(state: RequestState, max_new_tokens: int) -> bool:
    """Whether a tokenized request goes to the express lane: it is not bulk work (a job
    of ``low`` priority: a batch's lines, however short, share the main batch's steps at
    full throughput) and it is short (few rows, at most ``max_new_tokens`` new tokens, a
    small prompt). Whether the main lane is busy now does not matter: a request stays in
    the lane it joined, and a main batch that is small now may be 60 beam rows a moment
    later (requests arrive one by one)."""
    return (
        state.request.priority != "low"
        and state.n <= EXPRESS_ROWS
        and state.max_new <= max_new_tokens
        and state.cost <= EXPRESS_MAX_TOKENS
    )
