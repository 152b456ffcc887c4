"""A waiting /v1/completions call whose client goes away: the job is cancelled,
unless the client sent an Idempotency-Key (it may come back for the same job)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from api.routes import completions
from core.settings import Settings
from tests.conftest import submit_prompt


class _GoneClient:
    async def is_disconnected(self) -> bool:
        return True


@pytest.mark.parametrize(("cancel", "status"), [(True, "cancelled"), (False, "queued")])
def test_a_client_going_away_cancels_the_job_only_without_an_idempotency_key(
    client: TestClient, settings: Settings, cancel: bool, status: str
) -> None:
    job_id = submit_prompt(client)
    answer = asyncio.run(
        completions._wait(
            _GoneClient(),  # type: ignore[arg-type]
            settings.resolved_database_url,
            job_id,
            30.0,
            cancel_on_disconnect=cancel,
        )
    )
    assert answer.status_code == 499
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == status
