"""How many torch threads the engine's next forward should use: the CPUs other processes
leave it.

torch's CPU threads (GNU OpenMP) meet at a barrier after each of a forward's hundreds of
parallel regions. When another process holds one of the cores, the thread that shares it
waits for its time slice at every barrier, and the whole forward with it. On 2 cores,
GPT-2 in bf16 (bench/README.md, session 19): with the other core idle, 2 threads ran a
forward 1.3-1.9x as fast as 1; with one busy process beside it, 2 threads ran it
1.6-2.6x as slowly as 1, which hardly noticed the other process. So before each forward
the engine asks :class:`IdleCores` how many CPUs were left by other processes over the
last fraction of a second (``/proc/stat`` less this process's own CPU time) and runs
with at most that many threads. Where ``/proc`` is missing it keeps its threads.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

# A decision holds for at least this long: /proc counts CPU time in ticks (10 ms).
WINDOW_S = 0.2


@dataclasses.dataclass(frozen=True)
class Sample:
    """CPU seconds all processes (``busy``) and this one (``own``) had used, at ``at``."""

    busy: float
    own: float
    at: float


def read_sample() -> Sample | None:
    """Now's :class:`Sample` from ``/proc``, or None where there is none."""
    try:
        cpu = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()
        # Fields after the command name (which may hold spaces): utime, stime are 14, 15.
        own = Path("/proc/self/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    # (and steal: time the hypervisor gave to others, not this machine's processes').
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in cpu[1:8])
    busy = (user + nice + system + irq + softirq) / tick
    return Sample(busy=busy, own=(int(own[11]) + int(own[12])) / tick, at=time.monotonic())


class IdleCores:
    """The thread count for the next forward: ``most`` at most, at least 1, and no more
    than the CPUs other processes left idle over the last window (rounded)."""

    def __init__(
        self,
        most: int,
        cpus: int | None = None,
        sample: Callable[[], Sample | None] = read_sample,
    ) -> None:
        self.most = most
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self._sample = sample
        self._last = sample() if most > 1 else None
        self._threads = most

    def threads(self) -> int:
        """Threads for the next forward (the last window's answer until a new one ends)."""
        if self._last is None:
            return self.most
        now = self._sample()
        if now is None or now.at - self._last.at < WINDOW_S:
            return self._threads
        seconds = now.at - self._last.at
        others = max(0.0, (now.busy - self._last.busy) - (now.own - self._last.own)) / seconds
        self._last = now
        self._threads = max(1, min(self.most, round(self.cpus - others)))
        return self._threads
