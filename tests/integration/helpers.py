"""Real processes for integration tests: `genq worker` and `genq api` as users run them."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def genq_env(**values: str) -> dict[str, str]:
    """The environment for a genq process: no stray GENQ_* from outside, one torch thread,
    float32 (``auto`` would pick bf16 on CPUs that have it, and the expected texts are fp32's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(
        GENQ_TORCH_THREADS="1",
        GENQ_DTYPE="float32",
        GENQ_REQUIRE_AUTH="false",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
    )
    env.update(values)
    return env


@contextlib.contextmanager
def genq_process(
    args: list[str], env: dict[str, str], log: Path, *, prefix: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``genq ARGS`` until the block ends; its output goes to ``log``. ``prefix``
    runs it through another command that execs it (``ip netns exec NAME``)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        yield proc
    finally:
        stop(proc)


def python_process(
    script: str, args: Sequence[str], log: Path, *, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start ``python -c SCRIPT ARGS`` in the repository; its output goes to ``log``,
    ``prefix`` as for :func:`genq_process`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*prefix, sys.executable, "-c", script, *args], cwd=REPO, stdout=out, stderr=out
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask ``proc`` to end; kill it if it has not within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(check: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def unique_queue() -> str:
    return f"genq-test-{secrets.token_hex(4)}"


def drop_redis_queue(redis_url: str, queue: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = [queue, f"_kombu.binding.{queue}", *client.keys(f"{queue}\x06*")]
    client.delete(*keys)
    client.close()


def api_ready(port: int) -> bool:
    """Whether ``genq api`` on ``port`` answers /readyz with 200."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def api_and_worker(env: dict[str, str], port: int, logs: Path) -> Iterator[tuple[Path, Path]]:
    """``genq api`` on ``port`` and a ``genq worker``, until the block ends; yields
    their log paths once the API is ready."""
    api_log, worker_log = logs / "api.log", logs / "worker.log"
    with (
        genq_process(["api", "--port", str(port)], env, api_log),
        genq_process(["worker"], env, worker_log),
    ):
        wait_until(lambda: api_ready(port), 60, "the API", api_log)
        yield api_log, worker_log
