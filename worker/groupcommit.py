"""Group commit: the calls that arrive while one is running are made together, as one.

Each Celery message runs in its own task thread, and each claims its jobs and stores
their results in its own transaction. When many messages are in flight (a feeder's
window, a client's burst) those transactions compete for the CPU with the engine and
with each other, and most of their cost is per statement, not per row. Here the first
thread to call leads: it makes one call for every thread waiting at that moment; the
threads that arrive meanwhile wait, and the next of them leads the next round. A lone
call runs at once, so an idle worker pays nothing for it.

The function given takes the items of every caller of a round, concatenated, and
answers one result per item, in the same order; each caller gets back exactly the
results of its own items. A call that fails with several callers in it does not say
whose items made it fail (an id PostgreSQL cannot take, say): each of those callers
then calls alone, so a caller fails only where its own call would have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Entry(Generic[T, R]):
    items: list[T]
    results: list[R] = field(default_factory=list)
    error: BaseException | None = None
    alone: bool = False  # its round failed with other callers in it: call alone
    done: bool = False


class GroupCommit(Generic[T, R]):
    """``group(items)`` answers as ``fn(items)`` would alone; the items of the threads
    calling at the same time go through ``fn`` together."""

    def __init__(self, fn: Callable[[list[T]], list[R]]) -> None:
        self._fn = fn
        self._cond = threading.Condition()
        self._waiting: list[_Entry[T, R]] = []
        self._busy = False
        self.rounds = 0  # calls of fn made for groups (tests, metrics)

    @property
    def waiting(self) -> int:
        """Callers queued for the next round."""
        with self._cond:
            return len(self._waiting)

    def __call__(self, items: Sequence[T]) -> list[R]:
        entry: _Entry[T, R] = _Entry(list(items))
        with self._cond:
            self._waiting.append(entry)
            while self._busy and not entry.done:
                self._cond.wait()
            if not entry.done:  # this thread leads the next round
                self._busy = True
                group, self._waiting = self._waiting, []
        if not entry.done:
            self._lead(group)
        if entry.alone:  # nothing was done for it (the failed call rolled back)
            return self._fn(entry.items)
        if entry.error is not None:
            raise entry.error
        return entry.results

    def _lead(self, group: list[_Entry[T, R]]) -> None:
        try:
            try:
                results = self._fn([item for e in group for item in e.items])
            except Exception as exc:  # the call rolled back: nothing was done
                if len(group) == 1:
                    group[0].error = exc  # its own, as alone
                else:
                    # Whose items made it fail is not known: each caller calls alone
                    # (one request may fail only itself).
                    for e in group:
                        e.alone = True
                return
            start = 0
            for e in group:
                e.results = results[start : start + len(e.items)]
                start += len(e.items)
            if start != len(results):
                raise ValueError(f"{len(results)} results for {start} items")
        except BaseException:  # the leading thread's own (an interrupt): the others go on
            for e in group:
                e.alone = True
            raise
        finally:
            with self._cond:
                self.rounds += 1
                for e in group:
                    e.done = True
                self._busy = False
                self._cond.notify_all()
