"""The worker runs itself under jemalloc where the machine has it (cli/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.allocator import JEMALLOC_CONF, RAN_AGAIN, AllocatorError, allocator_env, find_jemalloc

REPO = Path(__file__).resolve().parents[2]
LIB = "libjemalloc.so.2"


def _lib() -> str:
    return LIB


def _not_asked() -> str:
    raise AssertionError("looked for a library it did not need")


def test_auto_preloads_jemalloc_once_and_keeps_what_was_preloaded() -> None:
    env = allocator_env("auto", {"LD_PRELOAD": "libother.so", "X": "1"}, loaded=False, library=_lib)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIB} libother.so"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    assert env["X"] == "1" and env[RAN_AGAIN] == "1"
    # The process run again never runs itself again, whatever it finds.
    assert allocator_env("auto", env, loaded=False, library=_not_asked) is None
    assert allocator_env("auto", env, loaded=True, library=_not_asked) is None


def test_a_users_malloc_conf_follows_ours_so_that_it_wins() -> None:
    env = allocator_env("auto", {"MALLOC_CONF": "dirty_decay_ms:5000"}, loaded=False, library=_lib)
    assert env is not None and env["MALLOC_CONF"] == f"{JEMALLOC_CONF},dirty_decay_ms:5000"


@pytest.mark.parametrize(
    ("choice", "environ", "loaded", "platform"),
    [
        ("auto", {}, True, "linux"),
        ("jemalloc", {}, True, "linux"),
        ("system", {}, False, "linux"),
        ("auto", {}, False, "darwin"),
        ("auto", {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, False, "linux"),
    ],
)
def test_nothing_changes_where_jemalloc_is_loaded_not_wanted_or_another_chosen(
    choice: str, environ: dict[str, str], loaded: bool, platform: str
) -> None:
    got = allocator_env(choice, environ, loaded=loaded, library=_not_asked, platform=platform)
    assert got is None


def test_auto_runs_on_with_the_c_library_where_no_jemalloc_is_installed() -> None:
    assert allocator_env("auto", {}, loaded=False, library=lambda: None) is None


@pytest.mark.parametrize(
    ("environ", "found", "platform", "says"),
    [
        ({}, None, "linux", "apt-get install libjemalloc2"),
        ({}, LIB, "darwin", "Linux only"),
        ({RAN_AGAIN: "1"}, LIB, "linux", "jemalloc is not loaded"),
        ({"LD_PRELOAD": "libmimalloc.so"}, LIB, "linux", "libmimalloc.so"),
    ],
)
def test_asking_for_jemalloc_where_it_cannot_be_had_is_a_clear_error(
    environ: dict[str, str], found: str | None, platform: str, says: str
) -> None:
    with pytest.raises(AllocatorError, match=says):
        allocator_env("jemalloc", environ, loaded=False, library=lambda: found, platform=platform)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", RAN_AGAIN)}
    return env | extra


_RUN = textwrap.dedent(
    """
    import os, sys
    from cli.allocator import jemalloc_loaded, run_again_with_allocator
    print("start", os.getpid(), flush=True)
    run_again_with_allocator(sys.argv[2])
    loaded = "loaded" if jemalloc_loaded() else "not-loaded"
    print(loaded, os.getpid(), os.environ.get("MALLOC_CONF"), sys.argv[1:])
    """
)


def _run(*args: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", _RUN, *args],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.split(maxsplit=3) for line in out.splitlines()]


needs_jemalloc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or find_jemalloc() is None, reason="no libjemalloc here"
)


@needs_jemalloc
def test_the_process_runs_itself_again_under_jemalloc_with_the_same_arguments() -> None:
    lines = _run("worker", "auto")
    # Started twice (the second time under jemalloc), same pid: exec, not a child.
    assert [line[0] for line in lines] == ["start", "start", "loaded"]
    assert lines[0][1] == lines[1][1] == lines[2][1]
    assert lines[2][2] == JEMALLOC_CONF and lines[2][3] == "['worker', 'auto']"
    # GENQ_ALLOCATOR=system, or another command: runs on as it is.
    assert [line[0] for line in _run("worker", "system")] == ["start", "not-loaded"]
    assert [line[0] for line in _run("api", "auto")] == ["start", "not-loaded"]


@needs_jemalloc
@pytest.mark.parametrize(
    ("choice", "says"), [("auto", "jemalloc"), ("system", "the C library"), ("", "the C library")]
)
def test_genq_worker_says_which_allocator_it_runs_with(
    tmp_path: Path, choice: str, says: str
) -> None:
    env = _clean_env(GENQ_MODEL="fake", GENQ_DATA_DIR=str(tmp_path))
    env.pop("GENQ_ALLOCATOR", None)
    if choice:  # none: the default, the C library's malloc
        env["GENQ_ALLOCATOR"] = choice
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "worker"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert first.startswith(f"memory allocator: {says}"), first
