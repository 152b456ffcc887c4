"""The real services a genq run needs: a fresh PostgreSQL database, a Redis queue, and
``genq api`` / ``genq worker`` processes, all removed again when the block ends."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._workload import REPO

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


class ServiceError(RuntimeError):
    """A genq process died or did not become ready; the message holds its log's tail."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def postgres_database(admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """A fresh database migrated to head; dropped (connections forced off) at the end."""
    from sqlalchemy import create_engine, text

    import migrations

    name = f"genq_bench_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = admin_url.rsplit("/", 1)[0] + f"/{name}"
        try:
            migrations.upgrade(url)
            yield url
        finally:
            _drop(admin, name)
    finally:
        admin.dispose()


def _drop(admin: Any, name: str, attempts: int = 10) -> None:
    """Drop database ``name``, retrying while PostgreSQL restarts or refuses connections."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except OperationalError:
            if attempt == attempts - 1:
                raise
            admin.dispose()  # the pooled connection may be the one that was cut
            time.sleep(1 + attempt)


@contextlib.contextmanager
def redis_queue(redis_url: str = REDIS_URL) -> Iterator[str]:
    """A unique Celery queue name (prefix); its Redis keys are deleted at the end."""
    import redis

    queue = f"genq-bench-{secrets.token_hex(4)}"
    try:
        yield queue
    finally:
        client = redis.Redis.from_url(redis_url)
        try:
            # The name is unique to this run, so every key that contains it is ours: the
            # queue(s) (genq may derive per-model/priority queues from it), kombu's
            # bindings and priority sub-queues.
            keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def genq_env(**values: str) -> dict[str, str]:
    """This environment without stray GENQ_* variables, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(values)
    return env


@contextlib.contextmanager
def genq_process(args: list[str], env: dict[str, str], log: Path) -> Iterator[GenqProcess]:
    """Run ``python -m cli ARGS`` in its own process group until the block ends.

    The whole group is stopped at the end (``genq api --workers N`` forks children):
    SIGTERM, then SIGKILL after a grace period.
    """
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield GenqProcess(proc, log)
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no child of its group lingers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


class GenqProcess:
    """A started genq process and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def tail(self, chars: int = 3000) -> str:
        """The end of the process's log."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def check_alive(self) -> None:
        """Raise :class:`ServiceError` with the log's tail if the process has exited."""
        code = self.proc.poll()
        if code is not None:
            raise ServiceError(f"{self.log.stem} exited with {code}:\n{self.tail()}")


def wait_until(
    check: Callable[[], Any], timeout: float, what: str, *procs: GenqProcess, every: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy; fail early if a process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        value = check()
        if value:
            return value
        time.sleep(every)
    tails = "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in procs)
    raise ServiceError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
