"""Shared fixtures: databases (SQLite, and PostgreSQL made per test), queues, apps."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import migrations
from api.app import create_app
from core.queue import Route, group_routes
from core.quotas import RateLimiter
from core.settings import Settings
from tests.integration.helpers import free_port

POSTGRES_ADMIN_URL = os.environ.get(
    "GENQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class RecordingQueue:
    """A queue that keeps the ids it was given, for tests that run no broker."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.routes: list[tuple[str, str | None, str]] = []
        self.messages: list[list[str]] = []  # the ids of each message sent
        self.down = False

    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append(job_id)
        self.routes.append((job_id, model, priority))
        self.messages.append([job_id])

    def enqueue_many(self, routes: Sequence[Route]) -> None:
        if self.down:
            raise ConnectionError("broker down")
        for model, lane, ids in group_routes(routes, size=8):
            self.sent.extend(ids)
            self.routes.extend((job_id, model, lane) for job_id in ids)
            self.messages.append(ids)

    def ping(self) -> None:
        if self.down:
            raise ConnectionError("broker down")

    def depth(self, queue: str) -> int:
        return 0

    def queued_jobs(self, queue: str) -> int:
        return 0


@pytest.fixture(autouse=True)
def fresh_express_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with full per-owner express budgets (core.express.PACE)."""
    from core import express

    monkeypatch.setattr(
        express, "PACE", RateLimiter(express.EXPRESS_RATE_PER_S, express.EXPRESS_BURST)
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'genq.db'}"
    migrations.upgrade(url)
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, dropped after the test."""
    name = f"genq_test_{secrets.token_hex(4)}"
    # No pool: a test may restart PostgreSQL, which kills pooled connections.
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - only where PostgreSQL is absent
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrations.upgrade(url)
    yield url
    from core.db import get_engine

    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        model="fake",
        default_max_new_tokens=16,
        require_auth=False,
    )


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def client(settings: Settings, queue: RecordingQueue) -> Iterator[TestClient]:
    with TestClient(create_app(settings, queue=queue)) as test_client:
        yield test_client


def submit_prompt(client: TestClient, prompt: str = "one two three", **body: Any) -> str:
    """POST a job and return its id (asserting the 202)."""
    response = client.post("/v1/jobs", json={"prompt": prompt, **body})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served over real HTTP by uvicorn in a thread (TestClient cannot read a
    stream as it arrives): its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
