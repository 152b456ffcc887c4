"""Tenancy and per-owner limits (SQLite and PostgreSQL): keys are separate tenants
unless made for the same owner; priority high is a key's permission; queued +
running jobs, file bytes, request rate and open streams are limited per owner
with a 429 and Retry-After, and one owner's limit never touches another's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from cli.main import app as cli
from core import keys, quotas
from core.db import session_scope
from core.settings import Settings, get_settings
from tests.conftest import RecordingQueue


def app_with(settings: Settings, **limits: Any) -> TestClient:
    tuned = settings.model_copy(update={"require_auth": True, **limits})
    return TestClient(create_app(tuned, queue=RecordingQueue()))


def key(settings: Settings, name: str, **kwargs: Any) -> dict[str, str]:
    with session_scope(settings.resolved_database_url) as session:
        _, secret = keys.create_key(session, name=name, **kwargs)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with app_with(settings) as client:
        yield client


def test_keys_with_the_same_name_are_separate_tenants(api: TestClient, settings: Settings) -> None:
    first, second = key(settings, "webapp"), key(settings, "webapp")
    job = api.post("/v1/jobs", json={"prompt": "hi"}, headers=first).json()
    assert api.get(f"/v1/jobs/{job['id']}", headers=second).status_code == 404
    with session_scope(settings.resolved_database_url) as session:
        owners = {k.owner for k in keys.list_keys(session)}
    assert len(owners) == 2 and all(o.startswith("ten_") for o in owners)
    shared = key(settings, "other-name", owner=next(iter(owners)))
    mine = [k for k in (first, second) if api.get(f"/v1/jobs/{job['id']}", headers=k).is_success]
    assert mine == [first]
    # A key made for the job's owner sees it, whatever its name.
    with session_scope(settings.resolved_database_url) as session:
        owner_of_job = keys.owner_of(session, first["Authorization"].split()[1])
    assert owner_of_job is not None
    sibling = key(settings, "sibling", owner=owner_of_job)
    assert api.get(f"/v1/jobs/{job['id']}", headers=sibling).status_code == 200
    assert shared  # (a key for the other tenant works too; it just sees other jobs)


def test_priority_high_only_for_keys_allowed_it(api: TestClient, settings: Settings) -> None:
    plain, allowed = key(settings, "plain"), key(settings, "vip", high_priority=True)
    denied = api.post("/v1/jobs", json={"prompt": "a", "priority": "high"}, headers=plain)
    assert denied.status_code == 403, denied.text
    assert denied.json()["error"]["param"] == "priority"
    bulk = {"jobs": [{"prompt": "a"}, {"prompt": "b", "priority": "high"}]}
    denied_bulk = api.post("/v1/jobs/bulk", json=bulk, headers=plain)
    assert denied_bulk.status_code == 403
    assert denied_bulk.json()["error"]["param"] == "jobs.1.priority"
    assert api.post("/v1/jobs", json={"prompt": "a", "priority": "low"}, headers=plain).is_success
    ok = api.post("/v1/jobs", json={"prompt": "a", "priority": "high"}, headers=allowed)
    assert ok.status_code == 202 and ok.json()["priority"] == "high"


def test_without_auth_everything_is_allowed(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"prompt": "a", "priority": "high"})
    assert response.status_code == 202


def test_queued_and_running_jobs_are_limited_per_owner(settings: Settings) -> None:
    with app_with(settings, quota_active_jobs=3) as api:
        alice, bob = key(settings, "alice"), key(settings, "bob")
        ids = [
            api.post("/v1/jobs", json={"prompt": "a"}, headers=alice).json()["id"] for _ in "abc"
        ]
        over = api.post("/v1/jobs", json={"prompt": "a"}, headers=alice)
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "quota_exceeded"
        assert int(over.headers["Retry-After"]) >= 1
        bulk = {"jobs": [{"prompt": "a"}, {"prompt": "b"}]}
        assert api.post("/v1/jobs/bulk", json=bulk, headers=bob).status_code == 202
        assert api.post("/v1/jobs/bulk", json=bulk, headers=bob).status_code == 429
        api.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice)  # one fewer queued
        assert api.post("/v1/jobs", json={"prompt": "a"}, headers=alice).status_code == 202


def upload(api: TestClient, headers: dict[str, str], size: int) -> Any:
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}'
    content = (line + b"\n") * (size // (len(line) + 1))
    return api.post(
        "/v1/files",
        files={"file": ("f.jsonl", content)},
        data={"purpose": "batch"},
        headers=headers,
    )


def test_stored_file_bytes_are_limited_per_owner(settings: Settings) -> None:
    with app_with(settings, quota_file_bytes=3000) as api:
        alice, bob = key(settings, "alice"), key(settings, "bob")
        first = upload(api, alice, 2000)
        assert first.status_code == 200, first.text
        over = upload(api, alice, 2000)
        assert over.status_code == 429 and over.json()["error"]["code"] == "storage_quota_exceeded"
        assert "Retry-After" in over.headers
        assert len(api.get("/v1/files", headers=alice).json()["data"]) == 1  # nothing kept
        assert upload(api, bob, 2000).status_code == 200
        api.delete(f"/v1/files/{first.json()['id']}", headers=alice)
        assert upload(api, alice, 2000).status_code == 200


def test_the_request_rate_is_limited_per_owner(settings: Settings) -> None:
    with app_with(settings, quota_requests_per_s=0.001, quota_request_burst=3) as api:
        alice, bob = key(settings, "alice"), key(settings, "bob")
        codes = [api.get("/v1/jobs", headers=alice).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = api.get("/v1/jobs", headers=alice)
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        assert api.get("/v1/jobs", headers=bob).status_code == 200


def test_rate_limiter_refills() -> None:
    limiter = quotas.RateLimiter(rate=2, burst=2)
    assert limiter.take("a", now=0) is None and limiter.take("a", now=0) is None
    wait = limiter.take("a", now=0)
    assert wait is not None and wait == pytest.approx(0.5)
    assert limiter.take("a", now=0.5) is None  # half a second: one more token
    assert limiter.take("b", now=0.5) is None


def test_wrong_api_keys_are_limited_per_client_address(settings: Settings) -> None:
    limits = {"quota_auth_failures_per_s": 0.001, "quota_auth_failure_burst": 3}
    with app_with(settings, **limits) as api:
        alice = key(settings, "alice")
        wrong = {"Authorization": "Bearer genq_not-a-key"}
        for _ in range(5):  # a valid key spends none of the address's failures
            assert api.get("/v1/jobs", headers=alice).status_code == 200
        codes = [api.get("/v1/jobs", headers=wrong).status_code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        # Refused before the key is looked at, so the right guess is not told apart.
        limited = api.get("/v1/jobs", headers=alice)
        assert limited.status_code == 429, limited.text
        assert limited.json()["error"]["code"] == "too_many_auth_failures"
        assert int(limited.headers["Retry-After"]) >= 1
        with TestClient(api.app, client=("192.0.2.7", 4000)) as elsewhere:
            assert elsewhere.get("/v1/jobs", headers=alice).status_code == 200
            assert elsewhere.get("/v1/jobs", headers=wrong).status_code == 401


def test_an_address_is_let_in_again_once_a_failure_has_refilled() -> None:
    failures = quotas.AuthFailures(rate=0.5, burst=2)
    failures.failed("1.2.3.4", now=0)
    failures.failed("1.2.3.4", now=0)
    with pytest.raises(quotas.QuotaExceededError) as raised:
        failures.check("1.2.3.4", now=1)
    assert raised.value.retry_after_s == pytest.approx(1)
    failures.check("5.6.7.8", now=1)  # another address
    failures.check("1.2.3.4", now=2)  # two seconds at 0.5 a second: one try again
    quotas.AuthFailures(rate=0, burst=1).check("1.2.3.4")  # rate 0: no limit, no raise


def test_an_ipv6_client_is_counted_per_64_not_per_address() -> None:
    failures = quotas.AuthFailures(rate=0.001, burst=2)
    failures.failed("2001:db8:1:2::1", now=0)
    failures.failed("2001:db8:1:2::a:b", now=0)  # a new address from the same /64
    with pytest.raises(quotas.QuotaExceededError):
        failures.check("2001:db8:1:2:ffff::3", now=1)
    failures.check("2001:db8:1:3::1", now=1)  # the next /64: someone else
    failures.failed("::ffff:192.0.2.1", now=0)  # an IPv4 client seen over IPv6
    failures.failed("192.0.2.1", now=0)
    with pytest.raises(quotas.QuotaExceededError):
        failures.check("192.0.2.1", now=1)


def test_the_addresses_remembered_stay_bounded() -> None:
    """A flood of wrong keys from ever new addresses must not grow memory without
    end (nor make every later request scan what it left)."""
    failures = quotas.AuthFailures(rate=0.001, burst=3)
    for i in range(100_100):  # each new address spends its whole burst
        for _ in range(3):
            failures.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", now=0)
    assert len(failures._bucket._buckets) <= 100_000
    with pytest.raises(quotas.QuotaExceededError):  # and the newest is still limited
        failures.check("10.1.135.3", now=0)  # the last of them (i = 100,099)
    limiter = quotas.RateLimiter(rate=1, burst=1, max_keys=10)
    for i in range(100):  # none refills: the longest untouched are forgotten
        limiter.take(str(i), now=i)
        assert len(limiter._buckets) <= 10
    limiter.take("late", now=1000)  # all refilled by now: forgotten, not evicted
    assert limiter.take("99", now=1000) is None


def test_open_event_streams_are_limited_per_owner(settings: Settings) -> None:
    # TestClient cannot hold a stream open (tests/security does, against a real
    # server): take the owner's one slot as an open stream would.
    with app_with(settings, quota_streams=1) as api:
        alice, bob = key(settings, "alice"), key(settings, "bob")
        job = api.post("/v1/jobs", json={"prompt": "a"}, headers=alice).json()["id"]
        bob_job = api.post("/v1/jobs", json={"prompt": "a"}, headers=bob).json()["id"]
        with session_scope(settings.resolved_database_url) as session:
            alice_owner = keys.owner_of(session, alice["Authorization"].split()[1])
        streams: quotas.StreamSlots = api.app.state.streams  # type: ignore[attr-defined]
        assert alice_owner is not None
        with streams.hold(alice_owner):
            second = api.get(f"/v1/jobs/{job}/events?max_s=1", headers=alice)
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "too_many_streams"
            waiting = api.post(
                "/v1/completions", json={"model": "fake", "prompt": "a"}, headers=alice
            )
            assert waiting.status_code == 429
            with api.stream("GET", f"/v1/jobs/{bob_job}/events?max_s=0.2", headers=bob) as r:
                assert r.status_code == 200
        assert streams.open(alice_owner) == 0 and streams.open("bob") == 0
        with api.stream("GET", f"/v1/jobs/{job}/events?max_s=0.2", headers=alice) as r:
            assert r.status_code == 200
        assert streams.open(alice_owner) == 0  # given back when the stream ended


def test_stream_slots() -> None:
    slots = quotas.StreamSlots(2)
    with slots.hold("a"), slots.hold("a"):
        with pytest.raises(quotas.QuotaExceededError):
            slots.acquire("a")
        with slots.hold("b"):
            assert slots.open("b") == 1
    assert slots.open("a") == 0


def test_keys_cli_takes_an_owner_and_the_high_priority_permission(
    tmp_path: Path, sqlite_url: str
) -> None:
    env = {"GENQ_DATABASE_URL": sqlite_url, "GENQ_DATA_DIR": str(tmp_path)}
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        made = runner.invoke(
            cli, ["keys", "create", "--name", "a", "--owner", "team-1", "--high-priority"], env=env
        )
        assert made.exit_code == 0, made.output
        with session_scope(sqlite_url) as session:
            caller = keys.caller_of(session, made.output.strip().splitlines()[-1])
        assert caller == keys.Caller(owner="team-1", high_priority=True)
        refused = runner.invoke(
            cli, ["keys", "create", "--name", "b", "--callback-url", "http://2130706433/"], env=env
        )
        assert refused.exit_code == 2 and "--callback-url" in refused.output
        other = runner.invoke(cli, ["keys", "create", "--name", "a"], env=env)
        assert other.exit_code == 0
        listed = runner.invoke(cli, ["keys", "list", "--owner", "team-1"], env=env).output
        assert "team-1" in listed and len(listed.strip().splitlines()) == 2  # header + 1
        bad_name = runner.invoke(cli, ["keys", "create", "--name", "x" * 300], env=env)
        assert bad_name.exit_code == 2 and "--name" in bad_name.output
    finally:
        get_settings.cache_clear()
