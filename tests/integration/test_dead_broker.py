"""A broker command whose reply a cut link lost must fail, not wait for hours.

A worker or API waiting for Redis's reply to a command has nothing to send, so
nothing tells it the server is gone: by default it waits for the kernel's two-hour
keepalive, however soon the link comes back (the server, by its own keepalive,
dropped that connection long before). genq's Redis connections probe the server
(``core.queue.broker_keepalive_options``), so the command fails within the limits
of genq's database connections and the caller's reconnect and retry take over.

This test runs a Redis server of its own on the hub address of a
:class:`~tests.integration.netns.Network` and asks it a blocking command from a
cut host, through the Celery app genq's API and worker use.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from core import db
from tests.integration.helpers import free_port, python_process, stop, wait_until
from tests.integration.netns import Network, unavailable_reason


def _unavailable() -> str | None:
    if shutil.which("redis-server") is None:
        return "no redis-server"
    return unavailable_reason()


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        (reason := _unavailable()) is not None, reason=f"dead broker test: {reason}"
    ),
]

# A blocking command whose answer (in 20 s) the cut loses, on genq's broker connection;
# then pings until the link is back (the pool reconnects).
CLIENT = """
import sys, time
from core.queue import make_celery
from core.settings import Settings
app = make_celery(Settings(broker_url=sys.argv[1]))
with app.connection_for_write() as connection:
    client = connection.default_channel.client
    print("asking", flush=True)
    try:
        client.execute_command("BLPOP", "genq-dead-broker", 20)
    except Exception as exc:
        print("failed:", type(exc).__name__, exc, flush=True)
    else:
        print("answered", flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            print("pinged:", client.ping(), flush=True)
            break
        except Exception:
            time.sleep(0.5)
"""


def test_a_broker_command_whose_reply_a_cut_lost_fails_instead_of_waiting(
    tmp_path: Path,
) -> None:
    with Network(1) as net:
        port = free_port(net.hub)
        server_log = tmp_path / "redis-server.log"
        server = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                net.hub,
                "--port",
                str(port),
                "--save",
                "",
                "--protected-mode",
                "no",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=server_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        admin = redis.Redis(host=net.hub, port=port)
        log = tmp_path / "client.log"
        client: subprocess.Popen[bytes] | None = None
        try:
            wait_until(lambda: _pings(admin), 30, "the Redis server", server_log)
            broker = f"redis://{net.hub}:{port}/0"
            client = python_process(CLIENT, [broker], log, prefix=net.command(0, []))
            blocked = lambda: any(c.get("cmd") == "blpop" for c in admin.client_list())  # noqa: E731
            wait_until(blocked, 60, "the client's command", log)
            time.sleep(1)  # the server has acknowledged the command: nothing of ours in flight
            net.cut(0)
            cut_at = time.monotonic()
            # A liveness deadline: without the probes it waits two hours.
            limit = db.TCP_KEEPALIVE_IDLE_S + db.TCP_KEEPALIVE_INTERVAL_S * db.TCP_KEEPALIVE_COUNT
            wait_until(lambda: "failed:" in log.read_text(), 4 * limit + 3, "the cut command", log)
            print(f"\nDEAD BROKER: the cut command failed after {time.monotonic() - cut_at:.1f} s")
            assert "ConnectionError" in log.read_text() or "TimeoutError" in log.read_text()
            net.heal(0)
            wait_until(lambda: "pinged: True" in log.read_text(), 60, "a ping after the heal", log)
            assert client.wait(timeout=30) == 0, log.read_text()
        finally:
            if client is not None:
                client.kill()
                client.wait()
            net.heal(0)
            admin.close()
            stop(server)


def _pings(admin: redis.Redis) -> bool:
    try:
        return bool(admin.ping())
    except redis.ConnectionError:
        return False
