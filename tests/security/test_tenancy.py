"""Tenants and limits against a running genq on PostgreSQL: keys with the same
name are separate tenants, priority high is a key's permission, and open event
streams are limited per owner (held open for real, which TestClient cannot)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from tests.integration.helpers import wait_until
from tests.security.conftest import STREAM_LIMIT, Stack


def test_same_name_keys_are_separate_tenants(stack: Stack) -> None:
    with stack.client(stack.key("shared")) as one, stack.client(stack.key("shared")) as two:
        job = one.post("/v1/jobs", json={"prompt": "mine"}).json()["id"]
        assert two.get(f"/v1/jobs/{job}").status_code == 404
        assert job not in [j["id"] for j in two.get("/v1/jobs").json()["data"]]
        assert two.post(f"/v1/jobs/{job}/cancel").status_code == 404


def test_priority_high_needs_the_keys_permission(stack: Stack) -> None:
    with stack.client(stack.key()) as plain, stack.client(stack.key(high_priority=True)) as vip:
        denied = plain.post("/v1/jobs", json={"prompt": "a", "priority": "high"})
        assert denied.status_code == 403 and denied.json()["error"]["param"] == "priority"
        assert vip.post("/v1/jobs", json={"prompt": "a", "priority": "high"}).status_code == 202


@contextlib.contextmanager
def open_stream(client: httpx.Client, job_id: str) -> Iterator[httpx.Response]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"max_s": 60}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: dropping it would close the connection
        next(lines)  # the first event: the stream is open
        yield response
        lines.close()


def test_open_streams_are_limited_per_owner(stack: Stack) -> None:
    with (
        stack.client(stack.key("streamer")) as alice,
        stack.client(stack.key("other")) as bob,
        contextlib.ExitStack() as streams,
    ):
        parked = {"prompt": "wait", "model": "parked"}  # never served: stays queued
        job = alice.post("/v1/jobs", json=parked).json()["id"]
        bob_job = bob.post("/v1/jobs", json=parked).json()["id"]
        held = [streams.enter_context(open_stream(alice, job)) for _ in range(STREAM_LIMIT)]
        over = alice.get(f"/v1/jobs/{job}/events", params={"max_s": 1})
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
        assert over.json()["error"]["code"] == "too_many_streams"
        with open_stream(bob, bob_job):
            pass  # another owner is not affected
        held[0].close()  # a client going away gives its slot back

        def can_open() -> bool:
            with alice.stream("GET", f"/v1/jobs/{job}/events", params={"max_s": 0.3}) as r:
                return r.status_code == 200

        wait_until(can_open, 30, "the slot to come back")


def test_wrong_keys_are_limited_per_client_address(stack: Stack) -> None:
    """Keys cannot be guessed at speed: past the default burst of wrong keys (20) an
    address gets 429 for any key, the right one too; other addresses are untouched.
    The guesser connects from 127.0.0.3, so the other tests' 127.0.0.1 keeps its budget."""
    valid = stack.key("guessed")
    wrong = {"Authorization": "Bearer genq_guess"}
    guesser = httpx.HTTPTransport(local_address="127.0.0.3")
    with httpx.Client(base_url=stack.url, transport=guesser, timeout=30) as client:
        codes = [client.get("/v1/jobs", headers=wrong).status_code for _ in range(21)]
        assert codes == [401] * 20 + [429]
        right = client.get("/v1/jobs", headers=valid)
        assert (
            right.status_code == 429 and right.json()["error"]["code"] == "too_many_auth_failures"
        )
        assert int(right.headers["Retry-After"]) >= 1
    with stack.client(valid) as elsewhere:
        assert elsewhere.get("/v1/jobs").status_code == 200
