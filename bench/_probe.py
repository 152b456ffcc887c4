"""Watching processes and services while a benchmark runs: peak RSS and CPU time of a
process group (read from /proc), a Redis queue's depth and bytes, PostgreSQL table stats.

A :class:`Sampler` polls in a daemon thread; each probe keeps its own maximum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (a genq process and its children)."""
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            # Fields after the command (which may hold spaces) start after the last ')'.
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now (0 if it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 if it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = (PROC / str(pid) / "stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    return 0.0


@dataclasses.dataclass
class GroupMemory:
    """The peak of a process group's summed RSS, and its RSS when reset."""

    pgid: int
    peak: int = 0
    start: int = 0

    def now(self) -> int:
        return sum(rss_bytes(pid) for pid in group_pids(self.pgid))

    def reset(self) -> None:
        self.start = self.peak = self.now()

    def sample(self) -> None:
        self.peak = max(self.peak, self.now())

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in group_pids(self.pgid))


@dataclasses.dataclass
class RedisQueues:
    """Messages and bytes held in the Redis lists of one genq queue prefix."""

    url: str
    prefix: str
    peak_messages: int = 0
    peak_bytes: int = 0
    last_rise: float = 0.0  # time.time() of the last sample whose depth rose
    _last: int = 0
    _client: Any = None

    def sample(self) -> None:
        import redis

        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        messages = size = 0
        for key in self._client.scan_iter(match=f"*{self.prefix}*", count=1000):
            if self._client.type(key) != b"list":
                continue
            messages += int(self._client.llen(key))
            size += int(self._client.memory_usage(key) or 0)
        if messages > self._last:
            self.last_rise = time.time()
        self._last = messages
        self.peak_messages = max(self.peak_messages, messages)
        self.peak_bytes = max(self.peak_bytes, size)


class Sampler:
    """Calls every probe's ``sample`` every ``every`` seconds in a daemon thread."""

    def __init__(self, probes: list[Callable[[], None]], every: float = 0.25) -> None:
        self._probes = probes
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            for probe in self._probes:
                with contextlib.suppress(Exception):  # a process gone, Redis busy: next time
                    probe()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Sample while the block runs (and once more at its end)."""
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
            for probe in self._probes:
                with contextlib.suppress(Exception):
                    probe()


def table_stats(db_url: str, table: str = "job") -> dict[str, Any]:
    """The table's size on disk, its live and dead rows and updates (HOT among them),
    and the database's deadlocks. PostgreSQL's statistics arrive up to ~10 s late."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            sizes = conn.execute(
                text("SELECT pg_total_relation_size(:t), pg_relation_size(:t)"), {"t": table}
            ).one()
            stats = conn.execute(
                text(
                    "SELECT n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, autovacuum_count "
                    "FROM pg_stat_user_tables WHERE relname = :t"
                ),
                {"t": table},
            ).one()
            deadlocks = conn.execute(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            ).scalar_one()
    finally:
        engine.dispose()
    return {
        "total_bytes": int(sizes[0]),
        "heap_bytes": int(sizes[1]),
        "live_rows": int(stats[0]),
        "dead_rows": int(stats[1]),
        "updates": int(stats[2]),
        "hot_updates": int(stats[3]),
        "autovacuums": int(stats[4]),
        "deadlocks": int(deadlocks),
    }
