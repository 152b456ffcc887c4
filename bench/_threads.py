"""Each in-process measurement on a thread of its own, as the worker runs its engine.

GNU OpenMP (torch's CPU threads) gives every thread that runs parallel work a team of its
own, and once the live teams' threads outnumber the CPUs they sleep between parallel
regions instead of spinning: on 2 cores a forward on a second team's thread took 105-120
ms where it took 90-97 ms alone (bench/README.md, issue 13, session 18). The worker
loads its model with one thread and runs it on its engine's thread only
(:func:`worker.engine.build_engine`). A benchmark that timed static batching on its main
thread with two threads and then the engine on the engine's thread would time the engine
beside a second team. So a benchmark's main thread keeps one torch thread
(:func:`single_threaded_main`) and each measurement runs on a thread that ends with it
(:func:`on_own_thread`; its team ends with it), or on the engine's own thread
(``BatchingEngine(threads=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def single_threaded_main() -> None:
    """This thread's torch work runs on one thread: it never starts an OpenMP team."""
    import torch

    torch.set_num_threads(1)


def on_own_thread(fn: Callable[[], T], threads: int) -> T:
    """``fn()`` on a new thread with ``threads`` torch threads; its result, or its error.
    The thread ends before this returns, and its OpenMP team with it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-measure") as pool:
        return pool.submit(_with_threads, fn, threads).result()


def _with_threads(fn: Callable[[], T], threads: int) -> T:
    import torch

    torch.set_num_threads(threads)
    return fn()
