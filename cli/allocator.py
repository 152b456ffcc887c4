"""The worker's memory allocator: jemalloc where the machine has it (``GENQ_ALLOCATOR``).

A decode step allocates tensors of tens of MB (the batch's logits, the KV cache's
buffers). glibc's malloc hands allocations that large straight to the kernel and
back at every free, so each step faults in fresh pages: 3,000-12,000 minor faults a
step at 128 rows of GPT-2 in bf16 here. jemalloc told to keep the pages it freed
(``dirty_decay_ms:-1``) serves the next step from them: 1,200-1,650 faults a step.
Whether that makes the worker faster was not settled on this project's 2-core VM:
1.07x the glibc median in process and 1.09x end to end over many alternated runs,
inside the machine's run-to-run swings (bench/README.md, "Issue 13, session 22"). So
it is opt-in; PyTorch's CPU tuning guide and Intel's launcher preload jemalloc or
tcmalloc for the same reason, and where it pays it is one setting away.

A library is preloaded only at a process's start, so ``genq worker`` runs itself
again (``exec``, same arguments) with ``LD_PRELOAD`` set, once: the new process finds
jemalloc loaded and goes on. The cost: the worker's memory does not shrink after a
peak (pages freed are kept for reuse), as with any preallocated KV cache.

- ``system`` (default): the C library's malloc;
- ``auto``: jemalloc on Linux where ``libjemalloc`` is installed (Debian and Ubuntu:
  ``libjemalloc2``; the Docker image has it), else the C library's;
- ``jemalloc``: jemalloc or a clear error.

A ``MALLOC_CONF`` already set is the user's: its settings follow genq's, so they win
where both name one. An ``LD_PRELOAD`` that already names an allocator (jemalloc,
tcmalloc, mimalloc) is the user's choice: the worker runs under it as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set on the process that runs again, so that a preload that did not take (a
# library that cannot be loaded) cannot make it run itself again and again.
RAN_AGAIN = "GENQ_ALLOCATOR_RAN_AGAIN"
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


class AllocatorError(RuntimeError):
    """GENQ_ALLOCATOR asks for what this machine cannot give."""


def jemalloc_loaded() -> bool:
    """Whether this process allocates with jemalloc (preloaded or linked): only
    jemalloc defines ``mallctl``."""
    try:
        return hasattr(ctypes.CDLL(None), "mallctl")
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
    library: Callable[[], str | None] = find_jemalloc,
    platform: str = sys.platform,
) -> dict[str, str] | None:
    """The environment to run the worker again with, or None to go on as it is.

    ``loaded``: whether jemalloc is in this process already; ``library`` finds the
    library to preload (called only where one is needed). Raises
    :class:`AllocatorError` where ``choice`` is ``jemalloc`` and this machine cannot
    preload it.
    """
    if choice == "system" or loaded:
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    other = next((name for name in _ALLOCATORS if name in preloaded), None)
    found = None
    if not platform.startswith("linux"):
        why_not = "GENQ_ALLOCATOR=jemalloc works on Linux only; unset it or say system"
    elif environ.get(RAN_AGAIN) or other:
        why_not = (
            f"GENQ_ALLOCATOR=jemalloc, but jemalloc is not loaded (LD_PRELOAD={preloaded!r});"
            " fix LD_PRELOAD or set GENQ_ALLOCATOR=system"
        )
    elif (found := library()) is None:
        why_not = (
            "GENQ_ALLOCATOR=jemalloc but no libjemalloc is installed (Debian/Ubuntu:"
            " apt-get install libjemalloc2); install it or set GENQ_ALLOCATOR=system"
        )
    else:
        why_not = None
    if found is None:  # why_not says why
        if choice == "jemalloc":
            raise AllocatorError(why_not)
        return None  # auto: the C library's malloc
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(p for p in (found, preloaded) if p)
    env["MALLOC_CONF"] = ",".join(c for c in (JEMALLOC_CONF, environ.get("MALLOC_CONF")) if c)
    env[RAN_AGAIN] = "1"
    return env


def run_again_with_allocator(choice: str, command: str = "worker") -> None:
    """Replace this process with itself under jemalloc where ``choice`` asks for it
    (:func:`allocator_env`); return where it runs on as it is. Only a process started
    as ``genq COMMAND`` runs again (its own arguments are what it runs again with),
    not one that calls the command from Python (tests, a ``CliRunner``)."""
    if choice == "system" or sys.argv[1:2] != [command]:
        return
    env = allocator_env(choice, os.environ, loaded=jemalloc_loaded())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def allocator_name() -> str:
    """What this process allocates with, for the worker's start-up log."""
    return "jemalloc" if jemalloc_loaded() else "the C library's malloc"
