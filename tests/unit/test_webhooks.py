"""Webhooks: signing, backoff, the outbox rows written with each final status, and
the claim-and-send logic against a fake HTTP transport (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from core import batches, jobs, jobstate, keys, submit, webhook_payloads, webhooks
from core.db import get_sessionmaker, session_scope
from core.models import Job, WebhookDelivery
from core.openai_format import COMPLETIONS_URL
from core.schemas import JobCreate
from core.settings import Settings
from tests.conftest import submit_prompt
from worker.dispatcher import Dispatcher
from worker.engine.fake import FakeEngine
from worker.runtime import WorkerRuntime

HOOK = "http://hooks.test/genq"


# --- signing and backoff -----------------------------------------------------------------


def test_a_signature_verifies_and_any_tampering_is_rejected() -> None:
    body, now = b'{"id":"job_1","status":"succeeded"}', 1_767_225_600
    header = webhooks.signature_header(["whsec_a"], body, now)
    assert header.startswith(f"t={now},v1=")
    assert webhooks.verify("whsec_a", header, body, 300, now=now + 10)
    assert not webhooks.verify("whsec_b", header, body, 300, now=now)  # wrong secret
    assert not webhooks.verify("whsec_a", header, body + b" ", 300, now=now)  # body
    moved = header.replace(f"t={now}", f"t={now + 1}")
    assert not webhooks.verify("whsec_a", moved, body, 300, now=now)  # timestamp
    assert not webhooks.verify("whsec_a", header, body, 300, now=now + 301)  # too old
    assert not webhooks.verify("whsec_a", "", body, 300, now=now)
    assert not webhooks.verify("whsec_a", "v1=abc,t=x", body, 300, now=now)


def test_one_signature_per_secret_and_any_one_verifies() -> None:
    body, now = b"{}", int(time.time())
    header = webhooks.signature_header(["whsec_old", "whsec_new"], body, now)
    assert header.count("v1=") == 2
    assert webhooks.verify("whsec_old", header, body)
    assert webhooks.verify("whsec_new", header, body)


def test_backoff_doubles_with_equal_jitter_up_to_a_cap() -> None:
    def low() -> float:
        return 0.0

    def high() -> float:
        return 1.0

    lows = [webhooks.backoff_s(n, base_s=5, max_s=60, rng=low) for n in range(1, 7)]
    highs = [webhooks.backoff_s(n, base_s=5, max_s=60, rng=high) for n in range(1, 7)]
    assert highs == [5, 10, 20, 40, 60, 60]
    assert lows == [h / 2 for h in highs]
    assert webhooks.backoff_s(10_000, base_s=5, max_s=60) <= 60  # no overflow


# --- the outbox --------------------------------------------------------------------------


@pytest.fixture
def runtime(settings: Settings) -> Iterator[WorkerRuntime]:
    rt = WorkerRuntime(settings, FakeEngine(max_prompt_words=20, token_delay_s=0.0))
    yield rt
    rt.close()


def new_job(session: Session, owner: str = "local", **body: Any) -> Job:
    create = JobCreate.model_validate({"prompt": "one two", **body})
    row = submit.job_row(
        submit.NewJob.from_create(create, default_model="fake"),
        job_id=submit.new_job_id(),
        owner=owner,
        default_max_new_tokens=4,
    )
    session.execute(insert(Job), [row])
    return session.get_one(Job, row["id"])


def outbox(settings: Settings) -> list[WebhookDelivery]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def test_success_and_failure_write_one_outbox_row_each(
    client: TestClient, runtime: WorkerRuntime, settings: Settings
) -> None:
    ok = submit_prompt(client, max_new_tokens=3, callback_url=HOOK)
    bad = submit_prompt(client, prompt=" ".join(["word"] * 50), callback_url=HOOK + "?x=1")
    quiet = submit_prompt(client, max_new_tokens=3)  # no callback anywhere: no row
    assert [runtime.run_job(j, worker="w1") for j in (ok, bad, quiet)] == [
        "succeeded",
        "failed",
        "succeeded",
    ]
    rows = {row.job_id: row for row in outbox(settings)}
    assert set(rows) == {ok, bad}
    assert (rows[ok].event, rows[ok].url, rows[ok].status) == ("job.succeeded", HOOK, "pending")
    assert (rows[bad].event, rows[bad].url) == ("job.failed", HOOK + "?x=1")
    assert rows[ok].attempts == 0 and rows[ok].owner == "local"


def test_cancel_through_the_api_writes_the_row_once(
    client: TestClient, runtime: WorkerRuntime, settings: Settings
) -> None:
    job_id = submit_prompt(client, callback_url=HOOK)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # again: no new row
    assert runtime.run_job(job_id, worker="w1") == "skipped"
    assert [(r.job_id, r.event) for r in outbox(settings)] == [(job_id, "job.cancelled")]
    webhook = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
    assert webhook["status"] == "pending" and webhook["attempts"] == 0
    assert webhook["event"] == "job.cancelled" and webhook["delivered_at"] is None


def test_quarantine_by_the_sweeper_writes_job_failed(
    client: TestClient, settings: Settings
) -> None:
    job_id = submit_prompt(client, callback_url=HOOK)
    with session_scope(settings.resolved_database_url) as session:
        claim = jobstate.claim_job(session, job_id, worker="w1", lease_s=60, max_attempts=1)
        assert claim is not None
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))
    with session_scope(settings.resolved_database_url) as session:
        requeued, failed = jobstate.reclaim_expired(session, max_attempts=1)
    assert (requeued, failed) == ([], [job_id])
    assert [(r.job_id, r.event) for r in outbox(settings)] == [(job_id, "job.failed")]


def test_the_owners_key_default_is_used_when_the_job_has_none(settings: Settings) -> None:
    url = settings.resolved_database_url
    with session_scope(url) as session:
        keys.create_key(session, name="a1", owner="alice", callback_url="http://old.test/")
    with session_scope(url) as session:
        key, _ = keys.create_key(session, name="a2", owner="alice", callback_url=HOOK)
        assert key.webhook_secret and key.webhook_secret.startswith("whsec_")
        plain = new_job(session, owner="alice")
        own = new_job(session, owner="alice", callback_url="http://own.test/")
        bob = new_job(session, owner="bob")
        for job in (plain, own, bob):
            jobstate.cancel_job(session, job.id)
    rows = {row.job_id: row.url for row in outbox(settings)}
    assert rows == {plain.id: HOOK, own.id: "http://own.test/"}  # the newest key's default


def make_batch(session: Any, lines: list[bytes], callback_url: str | None) -> Any:
    parsed = batches.parse_openai_file(
        enumerate(lines, start=1), endpoint=COMPLETIONS_URL, models=["fake"]
    )
    return batches.create_batch(
        session,
        owner="local",
        input_file_id=None,
        parsed=parsed,
        models=["fake"],
        max_lines=100,
        callback_url=callback_url,
    )


def request_line(custom_id: str) -> bytes:
    body = {"model": "fake", "prompt": "one two", "max_tokens": 2}
    line = {"custom_id": custom_id, "method": "POST", "url": COMPLETIONS_URL, "body": body}
    return json.dumps(line).encode()


def test_a_batch_sends_one_webhook_when_it_ends_not_one_per_job(
    settings: Settings, runtime: WorkerRuntime
) -> None:
    with get_sessionmaker(settings.resolved_database_url)() as session:  # it commits itself
        batch = make_batch(session, [request_line("a"), request_line("b")], HOOK)
        failed = make_batch(session, [b"not json"], HOOK)
        assert failed.status == "failed"
        ids = {batch.id: "batch.completed", failed.id: "batch.failed"}
        job_ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch.id)))
        session.rollback()
        for job_id in job_ids:
            assert runtime.run_job(job_id, worker="w1") == "succeeded"
        assert batches.finalize(session, batches.get_batch(session, batch.id, owner=None))
        session.commit()
    rows = {row.batch_id: row.event for row in outbox(settings)}
    assert rows == ids


# --- claim and send ----------------------------------------------------------------------


class Receiver:
    """A fake transport answering with the given status codes, then 200."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.codes.pop(0) if self.codes else 200, text="nope")


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"webhook_backoff_base_s": 0.01, "webhook_backoff_max_s": 0.02}
    )


def send_due(settings: Settings, receiver: Callable[[httpx.Request], httpx.Response]) -> int:
    dispatcher = Dispatcher(settings, transport=httpx.MockTransport(receiver))
    try:
        claimed = dispatcher.dispatch_once()
        assert dispatcher.wait_idle()
        return claimed
    finally:
        dispatcher.stop()


def test_a_delivery_is_signed_with_the_owners_key_and_shown_on_the_job(
    fast: Settings, runtime: WorkerRuntime
) -> None:
    url = fast.resolved_database_url
    with session_scope(url) as session:
        key, _ = keys.create_key(session, name="k", owner="local", callback_url=HOOK)
        secret = key.webhook_secret
        job = new_job(session)
    assert secret is not None
    assert runtime.run_job(job.id, worker="w1") == "succeeded"
    receiver = Receiver()
    assert send_due(fast, receiver) == 1
    (request,) = receiver.requests
    assert request.headers["Genq-Event"] == "job.succeeded"
    assert request.headers["Genq-Delivery"].startswith("whd_")
    assert webhooks.verify(secret, request.headers["Genq-Signature"], request.content)
    sent = json.loads(request.content)
    assert sent["id"] == job.id and sent["status"] == "succeeded" and "webhook" not in sent
    with session_scope(url) as session:
        webhook = jobs.view(session, jobs.get_job(session, job.id)).webhook
    assert webhook is not None
    assert (webhook.status, webhook.attempts, webhook.last_status_code) == ("delivered", 1, 200)
    assert webhook.delivered_at is not None
    assert send_due(fast, receiver) == 0  # delivered: never sent again


def test_failures_are_retried_with_backoff_then_delivered(
    fast: Settings, client: TestClient
) -> None:
    job_id = submit_prompt(client, callback_url=HOOK)
    client.post(f"/v1/jobs/{job_id}/cancel")
    receiver = Receiver(500, 503)
    deadline = time.monotonic() + 10
    while len(receiver.requests) < 3 and time.monotonic() < deadline:
        send_due(fast, receiver)
        time.sleep(0.02)
    assert len(receiver.requests) == 3
    ids = {r.headers["Genq-Delivery"] for r in receiver.requests}
    assert len(ids) == 1  # the same delivery id on every retry
    webhook = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
    assert (webhook["status"], webhook["attempts"], webhook["last_status_code"]) == (
        "delivered",
        3,
        200,
    )


def test_a_failing_receiver_is_given_up_on_after_the_retry_window(
    fast: Settings, client: TestClient
) -> None:
    short = fast.model_copy(update={"webhook_max_age_s": 0.001, "webhook_secret": "whsec_x"})
    job_id = submit_prompt(client, callback_url=HOOK)
    client.post(f"/v1/jobs/{job_id}/cancel")
    receiver = Receiver(500)
    assert send_due(short, receiver) == 1
    (request,) = receiver.requests  # the owner has no key: signed with GENQ_WEBHOOK_SECRET
    assert webhooks.verify("whsec_x", request.headers["Genq-Signature"], request.content)
    webhook = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
    assert webhook["status"] == "failed" and webhook["attempts"] == 1
    assert webhook["last_status_code"] == 500 and "HTTP 500" in webhook["last_error"]
    assert "nope" not in webhook["last_error"]  # the receiver's body is never stored


def test_a_claimed_delivery_is_not_claimed_again_until_its_lease_runs_out(
    fast: Settings, client: TestClient
) -> None:
    job_id = submit_prompt(client, callback_url=HOOK)
    client.post(f"/v1/jobs/{job_id}/cancel")
    url = fast.resolved_database_url
    with session_scope(url) as session:
        first = webhooks.claim_due(session, limit=10, lease_s=60)
    with session_scope(url) as session:
        assert webhooks.claim_due(session, limit=10, lease_s=60) == []
    assert [c.attempt for c in first] == [1]
    with session_scope(url) as session:  # the lease runs out (that dispatcher died)
        session.execute(update(WebhookDelivery).values(next_attempt_at=dt.datetime.now(dt.UTC)))
    with session_scope(url) as session:
        second = webhooks.claim_due(session, limit=10, lease_s=60)
    assert [c.attempt for c in second] == [2]
    # The first claim's late result is dropped: the second one owns the delivery now.
    with session_scope(url) as session:
        lost = webhooks.record_attempt(session, first[0], webhooks.Attempt(200, None), fast)
    assert lost is None
    with session_scope(url) as session:
        done = webhooks.record_attempt(session, second[0], webhooks.Attempt(204, None), fast)
    assert done == "delivered"


def test_a_lapsed_claim_is_not_posted(fast: Settings, client: TestClient) -> None:
    """A dispatcher that lost its claim while it could not reach the database (cut
    off, or stalled) does not POST once it can: another one owns the delivery."""
    job_id = submit_prompt(client, callback_url=HOOK)
    client.post(f"/v1/jobs/{job_id}/cancel")
    url = fast.resolved_database_url
    with session_scope(url) as session:
        (lapsed,) = webhooks.claim_due(session, limit=10, lease_s=60)
    with session_scope(url) as session:  # its lease runs out; another dispatcher claims it
        session.execute(update(WebhookDelivery).values(next_attempt_at=dt.datetime.now(dt.UTC)))
    with session_scope(url) as session:
        (owner,) = webhooks.claim_due(session, limit=10, lease_s=60)
    posted: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        posted.append(request)
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(receive)) as http:
        late = webhooks.deliver(url, http, lapsed, fast, webhook_payloads.build)
        assert late is None and posted == []
        assert webhooks.deliver(url, http, owner, fast, webhook_payloads.build) == "delivered"
    assert len(posted) == 1


def test_unreachable_receivers_and_vanished_jobs(fast: Settings, client: TestClient) -> None:
    down, gone = submit_prompt(client, callback_url=HOOK), submit_prompt(client, callback_url=HOOK)
    for job_id in (down, gone):
        client.post(f"/v1/jobs/{job_id}/cancel")
    with session_scope(fast.resolved_database_url) as session:
        session.execute(delete(Job).where(Job.id == gone))

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    assert send_due(fast, refuse) == 2
    rows = {row.job_id: row for row in outbox(fast)}
    assert rows[down].status == "pending" and "ConnectError" in (rows[down].last_error or "")
    assert rows[gone].status == "failed" and rows[gone].last_error == "the object no longer exists"


def test_the_verifier_in_the_docs_accepts_what_genq_signs() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "webhooks.md").read_text()
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(snippet, scope)
    body = b'{"id":"job_1"}'
    header = webhooks.signature_header(["whsec_a", "whsec_b"], body, int(time.time()))
    assert scope["verify"]("whsec_b", header, body)
    assert not scope["verify"]("whsec_c", header, body)
    assert not scope["verify"]("whsec_a", header, body + b" ")


def test_keys_cli_prints_the_webhook_secret_before_the_key_and_shows_it_again(
    tmp_path: Path, sqlite_url: str
) -> None:
    from typer.testing import CliRunner

    from cli.main import app as cli
    from core.settings import get_settings

    env = {"GENQ_DATABASE_URL": sqlite_url, "GENQ_DATA_DIR": str(tmp_path)}
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        args = ["keys", "create", "--name", "app", "--callback-url", HOOK]
        created = runner.invoke(cli, args, env=env)
        assert created.exit_code == 0, created.output
        lines = created.output.strip().splitlines()
        assert lines[-1].startswith("genq_") and " " not in lines[-1]  # the key, alone
        secret = next(line.split()[-1] for line in lines if line.startswith("webhook secret:"))
        assert secret.startswith("whsec_")
        key_id = lines[0].split()[1]
        shown = runner.invoke(cli, ["keys", "show", key_id], env=env)
        assert shown.exit_code == 0 and secret in shown.output and HOOK in shown.output
        assert lines[-1] not in shown.output
        bad = runner.invoke(cli, ["keys", "create", "--name", "x", "--callback-url", "ftp://x"])
        assert bad.exit_code == 2
        assert runner.invoke(cli, ["keys", "show", "key_nope"], env=env).exit_code == 1
    finally:
        get_settings.cache_clear()
