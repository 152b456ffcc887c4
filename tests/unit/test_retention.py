"""Retention: the sweeper purges finished jobs, batches and files past the age."""

from __future__ import annotations

import datetime as dt
import json

from fastapi.testclient import TestClient
from sqlalchemy import update

from core.db import session_scope
from core.models import File, Job, utcnow
from core.settings import Settings
from tests.conftest import RecordingQueue
from worker.sweeper import Sweeper

LINE = {
    "custom_id": "a",
    "method": "POST",
    "url": "/v1/completions",
    "body": {"model": "fake", "prompt": "one two", "max_tokens": 3},
}


def test_the_sweeper_purges_what_is_older_than_the_retention_age(
    client: TestClient, settings: Settings, queue: RecordingQueue
) -> None:
    old_job = client.post("/v1/jobs", json={"prompt": "old"}).json()["id"]
    new_job = client.post("/v1/jobs", json={"prompt": "new"}).json()["id"]
    queued_old = client.post("/v1/jobs", json={"prompt": "still queued"}).json()["id"]
    upload = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", json.dumps(LINE).encode(), "application/jsonl")},
        data={"purpose": "batch"},
    ).json()["id"]
    long_ago = utcnow() - dt.timedelta(days=40)
    with session_scope(settings.resolved_database_url) as session:
        for job_id in (old_job, new_job):
            session.execute(
                update(Job).where(Job.id == job_id).values(status="succeeded", finished_at=utcnow())
            )
        session.execute(
            update(Job)
            .where(Job.id.in_([old_job, queued_old]))
            .values(created_at=long_ago, finished_at=long_ago)
        )
        session.execute(update(Job).where(Job.id == queued_old).values(status="queued"))
        session.execute(update(File).where(File.id == upload).values(created_at=long_ago))

    report = Sweeper(settings, queue, holder="test").sweep_once()

    assert report["purged"] == 2  # the old finished job and the old file
    assert client.get(f"/v1/jobs/{old_job}").status_code == 404
    assert client.get(f"/v1/jobs/{new_job}").status_code == 200
    assert client.get(f"/v1/jobs/{queued_old}").status_code == 200  # not finished: kept
    assert client.get(f"/v1/files/{upload}").status_code == 404
