"""Who may run: ordinary jobs share the engine, a suspect runs alone, and a process
claims no more jobs than it has slots for."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode.

    Exclusive waiters go first: once one waits, new shared holders queue behind
    it, so a suspect job is never starved by a stream of ordinary ones.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class JobSlots:
    """At most ``capacity`` jobs claimed by this process at once.

    A message of several jobs waits until all of them fit, then takes them
    together (taking them one at a time could leave two messages each holding
    part of what it needs, forever). Each job gives its slot back once it is done
    (:meth:`Held.keep`), not when the message's last job is: a message of jobs
    of mixed lengths would otherwise keep slots idle behind its longest one, and
    the engine's batch short of rows. Jobs waiting here are still queued in SQL,
    so what a worker shows as running is what it is generating.

    Slots that free up go to the waiting message of the best ``rank`` (its queue's
    place in the consume order, 0 first), and ``reserved`` of them are only for
    messages of rank ``urgent_rank`` or better: a web app's short job that arrives
    while a batch's messages fill the slots and wait for more takes a slot at once
    instead of waiting for them.
    """

    def __init__(self, capacity: int, *, reserved: int = 0, urgent_rank: int = 0) -> None:
        self.capacity = capacity
        self.reserved = min(reserved, capacity - 1)
        self.urgent_rank = urgent_rank
        self._cond = threading.Condition()
        self._used = 0
        self._ranks: Counter[int] = Counter()  # waiting messages per rank

    @property
    def waiting(self) -> int:
        """Messages waiting for slots (their jobs still queued in SQL)."""
        with self._cond:
            return self._ranks.total()

    @contextmanager
    def hold(self, count: int, *, rank: int = 0) -> Iterator[Held]:
        """Wait until ``count`` slots fit (all of them, or the whole capacity), take
        them, and give back on leaving what was not given back before."""
        limit = self.capacity if rank <= self.urgent_rank else self.capacity - self.reserved
        count = min(count, limit)
        with self._cond:
            self._ranks[rank] += 1
            try:
                self._cond.wait_for(lambda: self._fits(count, rank, limit))
            finally:
                self._ranks[rank] -= 1
                self._cond.notify_all()  # a waiter of a worse rank may go now
            self._used += count
        held = Held(self, count)
        try:
            yield held
        finally:
            held.keep(0)

    def _give_back(self, count: int) -> None:
        with self._cond:
            self._used -= count
            self._cond.notify_all()

    def _fits(self, count: int, rank: int, limit: int) -> bool:
        ahead = any(n for r, n in self._ranks.items() if r < rank)
        return not ahead and self._used + count <= limit


class Held:
    """The slots one message holds (:meth:`JobSlots.hold`)."""

    def __init__(self, slots: JobSlots, count: int) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self.count = count
        """Slots still held."""

    def keep(self, jobs: int) -> None:
        """Hold no more slots than ``jobs`` (the message's jobs still running): the
        others go back. A message larger than the capacity holds all of it until
        its jobs still running fit."""
        with self._lock:
            count = max(0, self.count - jobs)
            self.count -= count
        if count:
            self._slots._give_back(count)
