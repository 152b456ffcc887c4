"""How many torch threads the engine's next forward should use: the CPUs other processes
leave it.

torch's CPU threads (GNU OpenMP) meet at a barrier after each of a forward's hundreds of
parallel regions. When another process holds one of the cores, the thread that shares it
waits for its time slice at every barrier, and the whole forward with it. On 2 cores,
GPT-2 in bf16 (bench/README.md, session 19): with the other core idle, 2 threads ran a
forward 1.3-1.9x as fast as 1; with one busy process beside it, 2 threads ran it
1.6-2.6x as slowly as 1, which hardly noticed the other process. So before each forward
the engine asks :class:`IdleCores` how many of its CPUs (those it may run on) were left
idle by other processes over the last fraction of a second (``/proc/stat``'s lines of
those CPUs, less this process's own CPU time) and runs with at most that many threads.

What it does not see: the worker's own other threads (they count as this process's),
time the hypervisor steals, and CPU quotas (cgroups). Where ``/proc`` is missing or
unreadable, or its counters do not move (gVisor reports zeros), it keeps its threads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# A decision holds for at least this long: /proc counts CPU time in ticks (10 ms).
WINDOW_S = 0.2
# A longer window (the engine sat idle) is started again rather than averaged over.
MAX_WINDOW_S = 1.0


@dataclasses.dataclass(frozen=True)
class Sample:
    """CPU seconds all processes (``busy``, on the CPUs counted) and this one (``own``)
    had used, at ``at`` (``time.monotonic``)."""

    busy: float
    own: float
    at: float


def usable_cpus() -> set[int]:
    """The CPUs this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return set(affinity(0))
    return set(range(os.cpu_count() or 1))


def read_sample(cpus: set[int]) -> Sample | None:
    """Now's :class:`Sample` over ``cpus`` from ``/proc``, or None where it cannot be read."""
    try:
        busy_ticks = 0
        for line in Path("/proc/stat").read_bytes().decode("ascii", "replace").splitlines():
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            # user nice system idle iowait irq softirq ...: busy = all but idle and iowait.
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
            busy_ticks += user + nice + system + irq + softirq
        # After the command name (which may hold spaces): utime and stime are 14 and 15.
        own = Path("/proc/self/stat").read_bytes().rsplit(b")", 1)[1].split()
        own_ticks = int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return Sample(busy=busy_ticks / tick, own=own_ticks / tick, at=time.monotonic())


class IdleCores:
    """The thread count for the next forward: ``most`` at most, at least 1, and no more
    than the CPUs other processes left idle over the last window (rounded half up)."""

    def __init__(
        self,
        most: int,
        cpus: set[int] | None = None,
        sample: Callable[[set[int]], Sample | None] = read_sample,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.most = most
        self.cpus = cpus if cpus is not None else usable_cpus()
        self._sample = sample
        self._clock = clock
        self._last = sample(self.cpus) if most > 1 else None
        self._threads = most

    def threads(self) -> int:
        """Threads for the next forward (the last window's answer until a new one ends)."""
        if self._last is None or self._clock() - self._last.at < WINDOW_S:
            return self._threads
        now = self._sample(self.cpus)
        if now is None:
            return self._threads
        seconds = now.at - self._last.at
        busy, own = now.busy - self._last.busy, now.own - self._last.own
        self._last = now
        if seconds > MAX_WINDOW_S:  # idle meanwhile: judge the next window alone
            return self._threads
        if busy <= 0 < own:  # counters that do not move (gVisor): keep the threads
            log.warning("/proc/stat does not count CPU time here; keeping %d threads", self.most)
            self._last, self._threads = None, self.most
            return self.most
        others = max(0.0, busy - own) / seconds
        self._threads = max(1, min(self.most, math.floor(len(self.cpus) - others + 0.5)))
        return self._threads
