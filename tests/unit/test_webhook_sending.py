"""Bounded webhook sends: Standard Webhooks signatures an off-the-shelf library
verifies, every live key's secret, attempt records that keep nothing of the
receiver's, a per-host limit that keeps one slow receiver from delaying others,
and giving up past the max age whatever happened (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from core import keys, webhook_pacing, webhooks
from core.db import session_scope
from core.models import LOCAL_OWNER, WebhookDelivery
from core.settings import Settings
from tests.conftest import submit_prompt
from worker.dispatcher import Dispatcher


def cancelled_with_hook(client: TestClient, url: str = "http://hooks.test/x") -> str:
    job_id = submit_prompt(client, callback_url=url)
    client.post(f"/v1/jobs/{job_id}/cancel")
    return job_id


def send(settings: Settings, receiver: Callable[[httpx.Request], httpx.Response]) -> int:
    dispatcher = Dispatcher(settings, transport=httpx.MockTransport(receiver))
    try:
        claimed = dispatcher.dispatch_once()
        assert dispatcher.wait_idle()
        return claimed
    finally:
        dispatcher.stop()


def test_the_standardwebhooks_library_verifies_with_any_live_keys_secret(
    settings: Settings, client: TestClient
) -> None:
    with session_scope(settings.resolved_database_url) as session:
        made = [keys.create_key(session, name=f"k{i}", owner=LOCAL_OWNER)[0] for i in range(7)]
        secrets_ = [key.webhook_secret for key in made]
    cancelled_with_hook(client)
    seen: list[httpx.Request] = []
    assert send(settings, lambda r: seen.append(r) or httpx.Response(204)) == 1
    (request,) = seen
    for secret in secrets_:  # the seventh key verifies as well as the first
        assert secret is not None
        Webhook(secret).verify(request.content, dict(request.headers))
        assert webhooks.verify(secret, request.headers["Genq-Signature"], request.content)
    assert request.headers["webhook-id"] == request.headers["Genq-Delivery"]
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "ab" * 24).verify(request.content, dict(request.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(secrets_[0] or "").verify(request.content + b" ", dict(request.headers))


def test_the_record_keeps_the_status_code_and_genqs_reason_never_the_body(
    settings: Settings, client: TestClient
) -> None:
    job_id = cancelled_with_hook(client)
    secret_body = '{"internal_admin_token": "tok_123"}\x00'
    assert send(settings, lambda r: httpx.Response(403, text=secret_body)) == 1
    hook = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
    assert hook["status"] == "pending" and hook["last_status_code"] == 403
    assert "tok_123" not in hook["last_error"] and hook["last_error"].startswith("HTTP 403")


def test_an_unstorable_error_message_is_stored_cleaned(
    settings: Settings, client: TestClient
) -> None:
    job_id = cancelled_with_hook(client)

    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("weird \x00 \udc80 text", request=request)

    assert send(settings, fail) == 1
    hook = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
    assert hook["status"] == "pending" and hook["attempts"] == 1
    assert "\x00" not in hook["last_error"] and "ConnectError" in hook["last_error"]


def test_a_slow_receiver_does_not_hold_up_another_hosts_webhook(
    settings: Settings, client: TestClient
) -> None:
    tuned = settings.model_copy(update={"webhook_senders": 4, "webhook_per_host": 2})
    slow_ids = [cancelled_with_hook(client, "http://slow.test/x") for _ in range(4)]
    fast_id = cancelled_with_hook(client, "http://fast.test/x")
    release, fast_seen = threading.Event(), threading.Event()
    slow_seen: list[str] = []
    lock = threading.Lock()
    in_flight = [0, 0]  # slow.test sends now, and the most at once

    def receiver(request: httpx.Request) -> httpx.Response:
        if request.url.host == "slow.test":
            with lock:
                slow_seen.append(request.headers["Genq-Delivery"])
                in_flight[0] += 1
                in_flight[1] = max(in_flight)
            release.wait(30)  # held until the fast one has arrived
            with lock:
                in_flight[0] -= 1
        else:
            fast_seen.set()
        return httpx.Response(200)

    dispatcher = Dispatcher(tuned, transport=httpx.MockTransport(receiver))
    try:
        for _ in range(200):  # as the dispatcher's loop would, without its sleeps
            dispatcher.dispatch_once()
            if fast_seen.wait(0.05):
                break
        assert fast_seen.is_set()  # while the slow sends are held
    finally:
        release.set()
        assert dispatcher.wait_idle()
        dispatcher.stop()
    assert in_flight[1] <= 2 and len(slow_seen) == 2  # two at once to slow.test, no more
    assert client.get(f"/v1/jobs/{fast_id}").json()["webhook"]["status"] == "delivered"
    # The slow ones that found their host busy were handed back, not counted.
    attempts = [client.get(f"/v1/jobs/{j}").json()["webhook"]["attempts"] for j in slow_ids]
    assert sum(attempts) == len(slow_seen) and attempts.count(0) >= 2


def test_host_slots() -> None:
    slots = webhook_pacing.HostSlots(2)
    assert slots.take("a:") and slots.take("a:") and not slots.take("a:") and slots.take("b:")
    slots.give("a:")
    assert slots.take("a:")
    assert webhook_pacing.host_of("http://Hooks.Test:81/x") == "hooks.test:81"


def test_a_delivery_past_its_max_age_is_given_up_whatever_its_attempts(
    settings: Settings, client: TestClient
) -> None:
    job_id = cancelled_with_hook(client)
    url = settings.resolved_database_url
    with session_scope(url) as session:  # claimed by a dispatcher that then died
        assert len(webhooks.claim_due(session, limit=10, lease_s=3600)) == 1
        old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120)
        session.execute(update(WebhookDelivery).values(created_at=old))
    with session_scope(url) as session:
        assert webhook_pacing.give_up_stale(session, max_age_s=60) == 1
    with session_scope(url) as session:
        row = session.scalars(select(WebhookDelivery)).one()
        assert row.status == "failed" and row.last_error == webhook_pacing.STALE_REASON
    assert client.get(f"/v1/jobs/{job_id}").json()["webhook"]["status"] == "failed"
