"""Bulk work steps aside while web apps' jobs are about.

A worker shares its process (one interpreter lock) and its machine with the jobs of
every lane. While a batch runs, its claims, stores and top-ups keep the worker busy,
and a web app's job waits at every step for its turn: measured on 2 cores with the
fake model, 3-4x its idle round trip, though it waits in no queue behind the batch.

So while urgent jobs (``high`` and ``express`` messages) are in the worker, and for
:data:`URGENT_WINDOW_S` after the last of them (a web app sends its next job soon),
each round of the other jobs' claims and stores, and each top-up of the feeder, is
followed by a pause: bulk work then takes at most ``GENQ_BULK_SHARE`` of the time it
would. The pause is made while the round still holds its group (worker.groupcommit),
so the calls arriving meanwhile go together in the next round: fewer, larger rounds.

The engine is not paced: with a real model, bulk throughput is the engine's, and the
rounds are a small part of it; where they are most of it (a tiny model, the fake
one), a batch runs at about that share of its speed while web apps are busy.
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
    """Pauses bulk work after each of its rounds while urgent jobs are about."""

    def __init__(
        self,
        share: float,
        *,
        window_s: float = URGENT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
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

    def pause_after(self, spent_s: float) -> float:
        """After a bulk round of ``spent_s`` seconds, pause so that bulk work takes
        ``share`` of the time (at most :data:`MAX_PAUSE_S`) while stepping aside;
        returns the pause."""
        if self.share >= 1 or not self.stepping_aside():
            return 0.0
        pause = min(spent_s * (1 / self.share - 1), MAX_PAUSE_S)
        if pause > 0:
            self._sleep(pause)
            with self._lock:
                self.paused_s += pause
        return pause

    def paced(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn``, with :meth:`pause_after` its call (whether it returned or raised)."""

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            start = self._clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.pause_after(self._clock() - start)

        return call
