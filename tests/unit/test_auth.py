"""Access: keys are required by default, and each owner sees only its own jobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from cli.main import app as cli
from core import keys
from core.db import session_scope
from core.settings import Settings
from tests.conftest import RecordingQueue


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"require_auth": True})


@pytest.fixture
def auth_client(auth_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(auth_settings, queue=RecordingQueue())) as client:
        yield client


def new_key(settings: Settings, owner: str) -> dict[str, str]:
    with session_scope(settings.resolved_database_url) as session:
        _, secret = keys.create_key(session, name=f"{owner}-key", owner=owner)
    return {"Authorization": f"Bearer {secret}"}


def test_missing_or_wrong_key_is_401_with_a_json_error(auth_client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer genq_wrong"}, {"Authorization": "Basic abc"}):
        response = auth_client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    posted = auth_client.post("/v1/jobs", json={"prompt": "hi"})
    assert posted.status_code == 401
    assert auth_client.get("/healthz").status_code == 200


def test_each_owner_sees_only_its_own_jobs(
    auth_client: TestClient, auth_settings: Settings
) -> None:
    alice, alice_again, bob = (
        new_key(auth_settings, "alice"),
        new_key(auth_settings, "alice"),
        new_key(auth_settings, "bob"),
    )
    job = auth_client.post("/v1/jobs", json={"prompt": "hi"}, headers=alice).json()
    assert auth_client.get(f"/v1/jobs/{job['id']}", headers=alice_again).status_code == 200
    assert auth_client.get(f"/v1/jobs/{job['id']}", headers=bob).status_code == 404
    assert auth_client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    assert auth_client.get("/v1/jobs", headers=bob).json()["data"] == []
    assert [j["id"] for j in auth_client.get("/v1/jobs", headers=alice).json()["data"]] == [
        job["id"]
    ]


def test_a_revoked_key_is_401(auth_client: TestClient, auth_settings: Settings) -> None:
    headers = new_key(auth_settings, "carol")
    assert auth_client.get("/v1/jobs", headers=headers).status_code == 200
    with session_scope(auth_settings.resolved_database_url) as session:
        (key,) = [k for k in keys.list_keys(session) if k.owner == "carol"]
        keys.revoke_key(session, key.id)
    assert auth_client.get("/v1/jobs", headers=headers).status_code == 401


def test_keys_cli_shows_the_key_once_on_the_last_line(tmp_path: Path, sqlite_url: str) -> None:
    env = {"GENQ_DATABASE_URL": sqlite_url, "GENQ_DATA_DIR": str(tmp_path)}
    from core.settings import get_settings

    get_settings.cache_clear()
    runner = CliRunner()
    try:
        created = runner.invoke(cli, ["keys", "create", "--name", "ci"], env=env)
        assert created.exit_code == 0, created.output
        secret = created.output.strip().splitlines()[-1]
        assert secret.startswith("genq_") and " " not in secret
        with session_scope(sqlite_url) as session:  # a tenant of its own, not the name
            owner = keys.owner_of(session, secret)
            assert owner is not None and owner.startswith("ten_")
        listed = runner.invoke(cli, ["keys", "list"], env=env)
        assert "ci" in listed.output and secret not in listed.output
        key_id = created.output.split()[1]
        assert runner.invoke(cli, ["keys", "revoke", key_id], env=env).exit_code == 0
        with session_scope(sqlite_url) as session:
            assert keys.owner_of(session, secret) is None
    finally:
        get_settings.cache_clear()
