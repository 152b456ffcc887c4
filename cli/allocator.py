"""The worker's memory allocator: jemalloc where the machine has it (``GENQ_ALLOCATOR``).

A decode step allocates tensors of tens of MB (the batch's logits, the KV cache's
buffers). glibc's malloc hands allocations that large straight to the kernel and
back at every free, so each step faults in thousands of fresh pages: 3,400-12,000
minor faults a step at 128 rows of GPT-2 in bf16 here. jemalloc told to keep the
pages it freed (``dirty_decay_ms:-1``) serves the next step from them: 1,200-1,650
faults a step, and the engine 1.12x as fast (bench/README.md, "Issue 13, session 22").
PyTorch's own CPU tuning guide and Intel's launcher preload jemalloc or tcmalloc for
the same reason.

A library is preloaded only at a process's start, so ``genq worker`` runs itself
again (``exec``, same arguments) with ``LD_PRELOAD`` set, once: the new process finds
jemalloc loaded and goes on. The cost: the worker's memory does not shrink after a
peak (pages freed are kept for reuse), as with any preallocated KV cache.

- ``auto`` (default): jemalloc on Linux where ``libjemalloc`` is installed (Debian
  and Ubuntu: ``libjemalloc2``), else the system's malloc, as before;
- ``jemalloc``: jemalloc or a clear error;
- ``system``: the C library's malloc.

A ``MALLOC_CONF`` already set is the user's and is kept as it is.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set on the process that runs again, so that a preload that did not take (a
# library that cannot be loaded) cannot make it run itself again and again.
RAN_AGAIN = "GENQ_ALLOCATOR_RAN_AGAIN"


class AllocatorError(RuntimeError):
    """GENQ_ALLOCATOR asks for what this machine cannot give."""


def jemalloc_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether jemalloc is mapped into this process (preloaded or linked)."""
    try:
        return "libjemalloc" in maps.read_text()
    except OSError:
        return False


def find_jemalloc() -> str | None:
    """The jemalloc library the dynamic loader would load (its soname), or None."""
    return ctypes.util.find_library("jemalloc")


def allocator_env(
    choice: str,
    environ: Mapping[str, str],
    *,
    loaded: bool,
    library: str | None,
    platform: str = sys.platform,
) -> dict[str, str] | None:
    """The environment to run the worker again with, or None to go on as it is.

    ``loaded``: whether jemalloc is in this process already; ``library``: what
    :func:`find_jemalloc` found. Raises :class:`AllocatorError` where ``choice`` is
    ``jemalloc`` and this machine cannot preload it.
    """
    if choice == "system" or loaded:
        return None
    if choice == "jemalloc" and not platform.startswith("linux"):
        raise AllocatorError("GENQ_ALLOCATOR=jemalloc works on Linux only; unset it or say system")
    if environ.get(RAN_AGAIN):
        if choice == "jemalloc":
            raise AllocatorError(
                f"preloading {library or 'jemalloc'} did not load it; set GENQ_ALLOCATOR=system"
            )
        return None
    if not platform.startswith("linux"):
        return None
    if library is None:
        if choice == "jemalloc":
            raise AllocatorError(
                "GENQ_ALLOCATOR=jemalloc but no libjemalloc is installed (Debian/Ubuntu:"
                " apt-get install libjemalloc2); install it or set GENQ_ALLOCATOR=system"
            )
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[RAN_AGAIN] = "1"
    return env


def run_again_with_allocator(choice: str) -> None:
    """Replace this process with itself under jemalloc where ``choice`` asks for it
    (:func:`allocator_env`); return where it runs on as it is."""
    env = allocator_env(choice, os.environ, loaded=jemalloc_loaded(), library=find_jemalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def allocator_name() -> str:
    """What this process allocates with, for the worker's start-up log."""
    return "jemalloc" if jemalloc_loaded() else "the C library's malloc"
