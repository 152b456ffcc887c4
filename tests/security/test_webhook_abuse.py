"""Webhooks as an attacker would use them, against a running genq on PostgreSQL:
SSRF by every spelling of an internal address, a read-back of an internal
server's answer, receivers that stall, trickle or answer with unstorable bytes."""

from __future__ import annotations

import functools
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from tests.integration.helpers import wait_until
from tests.security.conftest import RECEIVER_HOST, Receiver, Stack, answer, internal_name

SPELLINGS = [
    "127.0.0.1", "2130706433", "0x7f.1", "017700000001", "127.1", "0x7f000001", "[::1]",
    "localhost", "169.254.169.254", "10.0.0.1", "100.64.0.1", "[::ffff:127.0.0.1]",
    "0.0.0.0", "224.0.0.1", "[fe80::1]",
]  # fmt: skip
SECRET = b'{"internal_admin_token": "tok_s3cr3t"}'


def settled_webhook(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    hook: dict[str, Any] | None = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
    return hook if hook and hook["status"] != "pending" else None


def submit(client: httpx.Client, callback_url: str) -> str:
    body = {"prompt": "one two", "max_new_tokens": 2, "callback_url": callback_url}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


@pytest.mark.parametrize("host", SPELLINGS)
def test_internal_addresses_in_any_spelling_are_refused_at_submit(stack: Stack, host: str) -> None:
    with stack.client(stack.key()) as client:
        url = f"http://{host}:8080/secret"
        for path, body, param in (
            ("/v1/jobs", {"prompt": "x", "callback_url": url}, "callback_url"),
            ("/v1/jobs/bulk", {"jobs": [{"prompt": "x", "callback_url": url}]},
             "jobs.0.callback_url"),
            ("/v1/batches", {"input_file_id": "file-x", "callback_url": url}, "callback_url"),
        ):  # fmt: skip
            response = client.post(path, json=body)
            assert response.status_code == 422, (path, response.text)
            assert response.json()["error"]["param"] == param


def test_a_name_resolving_inside_fails_the_delivery_and_reads_nothing_back(stack: Stack) -> None:
    name = internal_name()
    if name is None:
        pytest.skip("this machine's host name does not resolve to an internal address")
    with Receiver(answer(403, SECRET), host="127.0.0.1") as admin, stack.client(stack.key()) as c:
        job_id = submit(c, f"http://{name}:{admin.port}/secret")
        hook = wait_until(functools.partial(settled_webhook, c, job_id), 60, "the webhook")
        assert admin.posts == []  # the internal server was never reached
    assert hook["status"] == "failed" and hook["last_status_code"] is None
    assert "refused by the egress policy" in hook["last_error"]
    assert "tok_s3cr3t" not in str(hook)


def test_a_receivers_body_is_never_stored_even_with_unstorable_bytes(stack: Stack) -> None:
    body = SECRET + b"\x00\xff\xfe \xed\xa0\x80"  # NUL, invalid UTF-8, an encoded surrogate
    with (
        Receiver(answer(403, body), host=RECEIVER_HOST) as receiver,
        stack.client(stack.key()) as client,
    ):
        job_id = submit(client, receiver.url)
        # Retried, then given up within GENQ_WEBHOOK_MAX_AGE_S: the row was storable.
        hook = wait_until(functools.partial(settled_webhook, client, job_id), 60, "give-up")
    assert hook["status"] == "failed" and hook["last_status_code"] == 403
    assert hook["attempts"] >= 2 and len(receiver.posts) == hook["attempts"]
    assert "tok_s3cr3t" not in hook["last_error"]


def trickle(receiver_stop: threading.Event) -> Any:
    def handle(h: BaseHTTPRequestHandler) -> None:
        # A byte a tenth of a second, forever: per-read timeouts never fire.
        for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: y\r\n" * 10_000:
            if receiver_stop.is_set():
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.1)

    return handle


def test_trickling_and_huge_receivers_do_not_delay_another_owners_webhook(stack: Stack) -> None:
    stop = threading.Event()
    huge = b"x" * (50 * 1024 * 1024)
    with (
        Receiver(trickle(stop), host=RECEIVER_HOST) as slow_a,
        Receiver(trickle(stop), host=RECEIVER_HOST) as slow_b,
        Receiver(answer(200, huge), host=RECEIVER_HOST) as big,
        Receiver(answer(204), host=RECEIVER_HOST) as fast,
        stack.client(stack.key("attacker")) as attacker,
        stack.client(stack.key("victim")) as victim,
    ):
        for receiver in (slow_a, slow_b, slow_a, slow_b, slow_a, slow_b):
            submit(attacker, receiver.url)
        big_job = submit(attacker, big.url)
        wait_until(lambda: slow_a.posts and slow_b.posts, 60, "the slow sends")
        job_id = submit(victim, fast.url)
        hook = wait_until(functools.partial(settled_webhook, victim, job_id), 60, "the webhook")
        # Delivered while the slow receivers were still trickling to their senders.
        assert not stop.is_set()
        # A 50 MB answer is not read: its status line is all that counts.
        big_hook = wait_until(functools.partial(settled_webhook, attacker, big_job), 60, "big")
        stop.set()
    assert hook["status"] == "delivered" and hook["attempts"] == 1
    assert big_hook["status"] == "delivered" and big_hook["last_status_code"] == 200
