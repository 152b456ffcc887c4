"""Webhooks end to end: a real `genq worker` (fake model) on Redis and a fresh
PostgreSQL database sends signed deliveries to a real HTTP receiver on loopback,
which verifies each one with the key's webhook secret."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core import keys, webhooks
from core.db import session_scope
from core.models import LOCAL_OWNER
from core.queue import CeleryQueue
from core.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.helpers import (
    drop_redis_queue,
    genq_env,
    genq_process,
    unique_queue,
    wait_until,
)

pytestmark = pytest.mark.integration


class Receiver:
    """An HTTP server on a free loopback port that verifies every POST and answers
    with the queued status codes, then 200."""

    def __init__(self, secret: str, codes: list[int] | None = None) -> None:
        self.secret = secret
        self.codes = list(codes or [])
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signature = self.headers.get("Genq-Signature", "")
                with receiver._lock:
                    receiver.received.append(
                        {
                            "delivery": self.headers["Genq-Delivery"],
                            "event": self.headers["Genq-Event"],
                            "verified": webhooks.verify(receiver.secret, signature, body, 300),
                            "object": json.loads(body),
                        }
                    )
                    code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def deliveries(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.received)


@pytest.fixture
def stack(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Settings, TestClient, str]]:
    """Settings for a fresh database and queue, an in-process API, and the webhook
    secret of the key of the owner that jobs get with auth off."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=REDIS_URL,
        model="fake",
        queue=unique_queue(),
        require_auth=False,
        webhook_allow_networks="127.0.0.0/8",  # the receivers are local
    )
    with session_scope(postgres_url) as session:
        key, _ = keys.create_key(session, name="hooks", owner=LOCAL_OWNER)
        secret = key.webhook_secret
    assert secret is not None
    with TestClient(create_app(settings, queue=CeleryQueue(settings))) as client:
        yield settings, client, secret
    drop_redis_queue(REDIS_URL, settings.queue)


def worker_env(settings: Settings, tmp: Path) -> dict[str, str]:
    return genq_env(
        GENQ_DATABASE_URL=settings.resolved_database_url,
        GENQ_BROKER_URL=settings.resolved_broker_url,
        GENQ_MODEL="fake",
        GENQ_QUEUE=settings.queue,
        GENQ_DATA_DIR=str(tmp),
        GENQ_WEBHOOK_POLL_S="0.1",
        GENQ_WEBHOOK_BACKOFF_BASE_S="0.2",
        GENQ_WEBHOOK_BACKOFF_MAX_S="0.5",
        GENQ_WEBHOOK_TIMEOUT_S="5",
        GENQ_WEBHOOK_ALLOW_NETWORKS="127.0.0.0/8",
    )


def webhook_of(client: TestClient, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    hook: dict[str, Any] | None = job["webhook"]
    return hook if hook and hook["status"] != "pending" else None


def test_each_job_is_delivered_once_signed_with_the_keys_secret(
    stack: tuple[Settings, TestClient, str], tmp_path: Path
) -> None:
    settings, client, secret = stack
    log = tmp_path / "worker.log"
    with (
        Receiver(secret) as receiver,
        genq_process(["worker"], worker_env(settings, tmp_path), log),
    ):
        ids = []
        for prompt in ("one two three", "four five", "six"):
            body = {"prompt": prompt, "max_new_tokens": 3, "callback_url": receiver.url}
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        hooks = [
            wait_until(functools.partial(webhook_of, client, j), 60, f"webhook of {j}", log)
            for j in ids
        ]
    assert [h["status"] for h in hooks] == ["delivered"] * 3
    assert all(h["attempts"] == 1 and h["last_status_code"] == 200 for h in hooks)
    got = receiver.deliveries()
    assert sorted(d["object"]["id"] for d in got) == sorted(ids)  # exactly one per job
    assert all(d["verified"] for d in got)
    assert {d["event"] for d in got} == {"job.succeeded"}
    assert all(d["object"]["status"] == "succeeded" and d["object"]["output"] for d in got)
    assert len({d["delivery"] for d in got}) == 3


def test_a_receiver_failing_twice_gets_retried_until_delivered(
    stack: tuple[Settings, TestClient, str], tmp_path: Path
) -> None:
    settings, client, secret = stack
    log = tmp_path / "worker.log"
    with (
        Receiver(secret, codes=[500, 500]) as receiver,
        genq_process(["worker"], worker_env(settings, tmp_path), log),
    ):
        body = {"prompt": "one two", "max_new_tokens": 2, "callback_url": receiver.url}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        hook = wait_until(lambda: webhook_of(client, job_id), 60, "the webhook", log)
    assert (hook["status"], hook["attempts"], hook["last_status_code"]) == ("delivered", 3, 200)
    assert hook["last_error"] is None
    got = receiver.deliveries()
    assert len(got) == 3 and all(d["verified"] for d in got)
    assert len({d["delivery"] for d in got}) == 1  # one delivery, three attempts
    assert {d["object"]["id"] for d in got} == {job_id}
