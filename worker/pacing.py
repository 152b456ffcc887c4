"""Bulk work steps aside while web apps' jobs are about.

A worker shares its process (one interpreter lock) and its machine with the jobs of
every lane. While a batch runs, its claims, stores and top-ups keep the worker busy,
and a web app's job waits at every step for its turn: measured on 2 cores with the
fake model, 3-4x its idle round trip, though it waits in no queue behind the batch.

So while urgent jobs (``high`` and ``express`` messages) are in the worker, and for
:data:`URGENT_WINDOW_S` after the last of them (a web app sends its next job soon),
a round of the other jobs' claims, or of their stores, starts no sooner than a pause
after the previous one ended: ``1/GENQ_BULK_SHARE - 1`` times that round's length (5.7x
at the default 0.15), at most :data:`MAX_PAUSE_S`. Claims and stores pace apart, so
together they may take up to twice the share. The pause is taken before the next
round, so what a round did goes on at once (claimed jobs reach the engine, stored
results are seen), and the calls arriving meanwhile go together in the next round.

Urgent is any caller's: a short job of ``normal`` priority goes to ``express`` (paced
per owner, core.express), so a web app sending one every 2 s keeps a worker's bulk
work paced. The engine is not paced: with a real model, a batch's throughput is the
engine's and the rounds are a small part of it; where they are most of it (a tiny
model, the fake one), a batch slows while web apps are busy.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

URGENT_WINDOW_S = 2.0
"""How long after the last urgent job bulk work still steps aside."""

MAX_PAUSE_S = 0.25
"""The longest pause after one round, however long the round took."""


class BulkPacer:
    """Spaces bulk work's rounds out (a pause before each next one) while urgent jobs
    are about."""

    def __init__(
        self,
        share: float,
        *,
        window_s: float = URGENT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.share = share
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._urgent = 0
        self._last_urgent = -math.inf
        self.paused_s = 0.0
        """Seconds of pauses so far (logs, tests)."""

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """While this block runs, and for ``window_s`` after, bulk work steps aside."""
        with self._lock:
            self._urgent += 1
        try:
            yield
        finally:
            with self._lock:
                self._urgent -= 1
                self._last_urgent = self._clock()

    def stepping_aside(self) -> bool:
        """Whether urgent jobs are in the worker, or were within ``window_s``."""
        with self._lock:
            return self._urgent > 0 or self._clock() - self._last_urgent < self.window_s

    def pause_for(self, spent_s: float) -> float:
        """The pause owed after a bulk round of ``spent_s`` seconds: bulk rounds back
        to back then take ``share`` of the time (a round's pause is at most
        :data:`MAX_PAUSE_S`, so one longer than that takes more)."""
        return min(spent_s * (1 / self.share - 1), MAX_PAUSE_S)

    def wait_until(self, start_at: float) -> float:
        """While stepping aside, wait until ``start_at`` (the clock's time); returns
        the pause."""
        pause = start_at - self._clock()
        if pause <= 0 or not self.stepping_aside():
            return 0.0
        self._sleep(pause)
        with self._lock:
            self.paused_s += pause
        return pause

    def paced(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn``, whose next call waits (while stepping aside) for the pause its last
        call that returned owes (:meth:`pause_for`). The pause comes before the next
        round, not after this one, so what this one did (jobs claimed, results
        stored) goes on at once; a call that raised owes nothing."""
        next_start = -math.inf

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal next_start
            self.wait_until(next_start)
            start = self._clock()
            result = fn(*args, **kwargs)
            end = self._clock()
            next_start = end + self.pause_for(end - start)
            return result

        return call
