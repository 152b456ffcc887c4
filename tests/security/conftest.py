"""One running genq (``genq api`` + ``genq worker`` processes, fake model) on a fresh
PostgreSQL database for the adversarial tests, with authentication on, webhooks
allowed only to 127.0.0.2 (the receivers here; 127.0.0.1 stands for the internal
network), short webhook timeouts and a small stream limit."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import migrations
from core import keys
from core.db import session_scope
from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL
from tests.integration.helpers import (
    api_and_worker,
    drop_redis_queue,
    free_port,
    genq_env,
    unique_queue,
)

RECEIVER_HOST = "127.0.0.2"  # allowed by GENQ_WEBHOOK_ALLOW_NETWORKS below
STREAM_LIMIT = 2


@dataclasses.dataclass
class Stack:
    """The running API: its URL, the database, and a way to make keys."""

    url: str
    database_url: str
    logs: Path

    def key(self, name: str = "k", **kwargs: Any) -> dict[str, str]:
        with session_scope(self.database_url) as session:
            _, secret = keys.create_key(session, name=name, **kwargs)
        return {"Authorization": f"Bearer {secret}"}

    def client(self, headers: dict[str, str]) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    name = f"genq_sec_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - only where PostgreSQL is absent
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    database_url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrations.upgrade(database_url)
    tmp = tmp_path_factory.mktemp("security")
    queue, port = unique_queue(), free_port()
    env = genq_env(
        GENQ_DATABASE_URL=database_url,
        GENQ_BROKER_URL=REDIS_URL,
        GENQ_MODEL="fake",
        GENQ_QUEUE=queue,
        GENQ_DATA_DIR=str(tmp),
        GENQ_REQUIRE_AUTH="true",
        GENQ_WEBHOOK_ALLOW_NETWORKS=f"{RECEIVER_HOST}/32",
        GENQ_WEBHOOK_POLL_S="0.1",
        GENQ_WEBHOOK_TIMEOUT_S="2",
        GENQ_WEBHOOK_BACKOFF_BASE_S="0.2",
        GENQ_WEBHOOK_BACKOFF_MAX_S="0.5",
        GENQ_WEBHOOK_MAX_AGE_S="4",
        GENQ_QUOTA_STREAMS=str(STREAM_LIMIT),
        GENQ_MODELS="parked",  # accepted, never served: its jobs stay queued
        GENQ_MAX_BODY_BYTES=str(64 * 1024),
    )
    try:
        with api_and_worker(env, port, tmp):
            yield Stack(f"http://127.0.0.1:{port}", database_url, tmp)
    finally:
        drop_redis_queue(REDIS_URL, queue)
        from core.db import get_engine

        get_engine(database_url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Receiver:
    """A local HTTP server whose answer is ``handle(handler)``; records each POST."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None], host: str) -> None:
        self.posts: list[str] = []
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append(self.headers.get("Genq-Delivery", ""))
                with contextlib.suppress(OSError):  # the sender gave up on us: expected
                    handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def answer(code: int, body: bytes = b"") -> Callable[[BaseHTTPRequestHandler], None]:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


def internal_name() -> str | None:
    """A name (not a literal, not ``localhost``) that resolves to an internal
    address here: the machine's own host name usually does."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
    except OSError:
        return None
    import ipaddress

    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    return name if addresses and not all(a.is_global for a in addresses) else None
