"""api.streaming.follow: when a followed job's stream ends."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio

from api.streaming import follow


class _Client:
    async def is_disconnected(self) -> bool:
        return False


@dataclasses.dataclass
class _Counter:
    """Follows an integer that counts up: one event per new value, finished at ``last``."""

    last: int
    finished: bool = False
    seen: int = 0

    def start(self, first: int) -> list[str]:
        self.seen = first
        return []

    def update(self, snapshot: int) -> list[str]:
        events = [f"data: {n}\n\n" for n in range(self.seen + 1, snapshot + 1)]
        self.seen = snapshot
        self.finished = snapshot >= self.last
        return events

    def missing(self) -> list[str]:
        return ["missing"]

    def timeout(self, last: int) -> list[str]:
        self.finished = True
        return ["timeout"]

    def failed(self) -> list[str]:
        return ["failed"]


def _events(values: list[int], follower: _Counter, **limits: float) -> list[str]:
    reads = iter(values)

    async def collect() -> list[str]:
        request: Any = _Client()
        return [e async for e in follow(request, follower, 0, lambda: next(reads), **limits)]

    return anyio.run(collect)


def test_a_stream_with_news_outlives_its_idle_limit() -> None:
    """Text keeps coming for 20 polls (longer than idle_s): the stream goes on to the end."""
    events = _events(list(range(1, 21)), _Counter(last=20), idle_s=0.05, poll_s=0.01)
    assert events == [f"data: {n}\n\n" for n in range(1, 21)]


def test_a_quiet_stream_ends_after_its_idle_limit() -> None:
    """Nothing new for idle_s: the stream ends with the follower's timeout."""
    events = _events([1] + [1] * 1000, _Counter(last=5), idle_s=0.05, poll_s=0.01)
    assert events == ["data: 1\n\n", "timeout"]


def test_a_stream_ends_at_its_maximum_whatever_comes() -> None:
    events = _events(list(range(1, 1000)), _Counter(last=999), max_s=0.05, poll_s=0.01)
    assert events[-1] == "timeout" and len(events) < 100
