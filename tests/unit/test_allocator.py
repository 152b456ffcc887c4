"""The worker runs itself under jemalloc where the machine has it (cli/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.allocator import (
    JEMALLOC_CONF,
    RAN_AGAIN,
    AllocatorError,
    allocator_env,
    find_jemalloc,
    jemalloc_loaded,
)

REPO = Path(__file__).resolve().parents[2]
LIB = "libjemalloc.so.2"


def test_auto_preloads_jemalloc_once_and_keeps_what_was_preloaded() -> None:
    env = allocator_env("auto", {"LD_PRELOAD": "libother.so", "X": "1"}, loaded=False, library=LIB)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIB} libother.so"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    assert env["X"] == "1" and env[RAN_AGAIN] == "1"
    # The process run again never runs itself again, whatever it finds.
    assert allocator_env("auto", env, loaded=False, library=LIB) is None
    assert allocator_env("auto", env, loaded=True, library=LIB) is None


def test_a_users_malloc_conf_is_kept() -> None:
    env = allocator_env("auto", {"MALLOC_CONF": "narenas:2"}, loaded=False, library=LIB)
    assert env is not None and env["MALLOC_CONF"] == "narenas:2"


def test_nothing_changes_where_jemalloc_is_loaded_absent_or_not_wanted() -> None:
    assert allocator_env("auto", {}, loaded=True, library=LIB) is None
    assert allocator_env("jemalloc", {}, loaded=True, library=LIB) is None
    assert allocator_env("auto", {}, loaded=False, library=None) is None
    assert allocator_env("system", {}, loaded=False, library=LIB) is None
    assert allocator_env("auto", {}, loaded=False, library=LIB, platform="darwin") is None


@pytest.mark.parametrize(
    ("environ", "library", "platform", "says"),
    [
        ({}, None, "linux", "apt-get install libjemalloc2"),
        ({}, LIB, "darwin", "Linux only"),
        ({RAN_AGAIN: "1"}, LIB, "linux", "did not load it"),
    ],
)
def test_asking_for_jemalloc_where_it_cannot_be_had_is_a_clear_error(
    environ: dict[str, str], library: str | None, platform: str, says: str
) -> None:
    with pytest.raises(AllocatorError, match=says):
        allocator_env("jemalloc", environ, loaded=False, library=library, platform=platform)


def test_jemalloc_loaded_reads_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert jemalloc_loaded(maps)
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not jemalloc_loaded(maps)
    assert not jemalloc_loaded(tmp_path / "absent")


_RUN = textwrap.dedent(
    """
    import os, sys
    from cli.allocator import jemalloc_loaded, run_again_with_allocator
    print("start", os.getpid(), flush=True)
    run_again_with_allocator(sys.argv[1])
    loaded = "loaded" if jemalloc_loaded() else "not loaded"
    print(loaded, os.getpid(), os.environ.get("MALLOC_CONF"))
    """
)


def _run(choice: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", RAN_AGAIN)}
    out = subprocess.run(
        [sys.executable, "-c", _RUN, choice],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.split() for line in out.splitlines()]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or find_jemalloc() is None, reason="no libjemalloc here"
)
def test_the_process_runs_itself_again_under_jemalloc_with_the_same_arguments() -> None:
    lines = _run("auto")
    # Started twice (the second time under jemalloc), same pid: exec, not a child.
    assert [line[0] for line in lines] == ["start", "start", "loaded"]
    assert lines[0][1] == lines[1][1] == lines[2][1]
    assert lines[2][2] == JEMALLOC_CONF
    lines = _run("system")
    assert [line[0] for line in lines] == ["start", "not"] and lines[0][1] == lines[1][2]
