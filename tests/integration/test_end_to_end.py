"""A job flows from the HTTP API through Celery to a real `genq worker` holding a real
model, and its result lands in SQL: through Redis + PostgreSQL, and on the embedded
default (SQLite database, SQLite broker) with every piece a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.queue import CeleryQueue
from core.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.helpers import (
    REPO,
    api_and_worker,
    drop_redis_queue,
    free_port,
    genq_env,
    genq_process,
    unique_queue,
    wait_until,
)
from tests.tiny_model import STORIES, tiny_model_dir

pytestmark = pytest.mark.integration

LILY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
)
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def check_story(job: dict[str, Any]) -> None:
    assert job["status"] == "succeeded", job
    assert job["usage"]["completion_tokens"] <= 40
    assert job["finish_reason"] in ("length", "eos")
    if (STORIES / "config.json").is_file():  # the really-trained model: its greedy text is known
        assert (job["prompt"] + job["output"]).startswith(LILY)
        assert job["usage"]["completion_tokens"] == 40
        assert job["reproducibility"]["model_revision"]
        assert job["reproducibility"]["torch_version"]
        assert job["reproducibility"]["dtype"] == "float32"  # as genq_env asks
        assert job["reproducibility"]["products"] == _fp32_products()


def _fp32_products() -> str:
    """What a float32 worker's products run on here: packed on x86-64 with oneDNN."""
    import torch

    from worker.engine.fastpath.linear import can_pack

    return "packed" if can_pack(torch.ones(1), fp32=True) else "model"


@pytest.fixture
def redis_postgres(postgres_url: str, tmp_path: Path, model_dir: Path) -> Iterator[Settings]:
    queue = unique_queue()
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=REDIS_URL,
        model=str(model_dir),
        queue=queue,
        require_auth=False,
    )
    yield settings
    drop_redis_queue(REDIS_URL, queue)


def test_through_redis_and_postgres(redis_postgres: Settings, tmp_path: Path) -> None:
    s = redis_postgres
    env = genq_env(
        GENQ_DATABASE_URL=s.resolved_database_url,
        GENQ_BROKER_URL=s.resolved_broker_url,
        GENQ_MODEL=s.model,
        GENQ_QUEUE=s.queue,
        GENQ_DATA_DIR=str(tmp_path),
        GENQ_MAX_BATCH_SIZE="8",
    )
    log = tmp_path / "worker.log"
    with (
        genq_process(["worker", "--loglevel=INFO"], env, log),
        TestClient(create_app(s, queue=CeleryQueue(s))) as client,
    ):
        assert client.get("/readyz").status_code == 200
        story = client.post(
            "/v1/jobs",
            json={"prompt": "Once upon a time", "max_new_tokens": 40, "do_sample": False},
        )
        assert story.status_code == 202
        others = [
            client.post("/v1/jobs", json={"prompt": p, "max_new_tokens": 12}).json()["id"]
            for p in ("The dog", "Tim and Sue went to the", "A big red")
        ]

        def final(job_id: str) -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in FINAL else None

        job = wait_until(lambda: final(story.json()["id"]), 180, "the story job", log)
        check_story(job)
        for job_id in others:
            other = wait_until(lambda j=job_id: final(j), 60, "the other jobs", log)
            assert other["status"] == "succeeded"
            assert 1 <= other["usage"]["completion_tokens"] <= 12

        too_long = client.post("/v1/jobs", json={"prompt": "word " * 3000, "max_new_tokens": 5})
        failed = wait_until(lambda: final(too_long.json()["id"]), 60, "the long prompt", log)
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "prompt_too_long"

        # A bulk submit goes as genq.generate_many messages of up to 8 ids each.
        bodies = [
            {
                "prompt": f"The cat number {i}",
                "max_new_tokens": 6,
                "priority": ("high", "low")[i % 2],
            }
            for i in range(12)
        ]
        bulk = client.post("/v1/jobs/bulk", json={"jobs": bodies})
        assert bulk.status_code == 202, bulk.text
        for job_id in [j["id"] for j in bulk.json()["data"]]:
            done = wait_until(lambda j=job_id: final(j), 60, "the bulk jobs", log)
            assert done["status"] == "succeeded"
            assert 1 <= done["usage"]["completion_tokens"] <= 6


def test_embedded_default_with_real_processes_and_the_cli(model_dir: Path, tmp_path: Path) -> None:
    """Nothing configured but the model: SQLite files under GENQ_DATA_DIR, no servers."""
    port = free_port()
    env = genq_env(
        GENQ_DATA_DIR=str(tmp_path / "data"),
        GENQ_MODEL=str(model_dir),
        GENQ_API_URL=f"http://127.0.0.1:{port}",
        GENQ_MAX_BATCH_SIZE="8",
    )
    with api_and_worker(env, port, tmp_path) as (_, worker_log):
        submitted = subprocess.run(
            [
                sys.executable, "-m", "cli", "submit", "Once upon a time",
                "--max-new-tokens", "40", "--wait", "--timeout", "180", "--json",
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr + worker_log.read_text()[-3000:]
        job = json.loads(submitted.stdout)
        check_story(job)

        status = subprocess.run(
            [sys.executable, "-m", "cli", "status", job["id"]],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0
        assert "succeeded" in status.stdout
    assert (tmp_path / "data" / "genq.db").exists()
    assert (tmp_path / "data" / "broker.db").exists()


def test_a_missing_model_gives_a_clear_error(tmp_path: Path) -> None:
    env = genq_env(GENQ_DATA_DIR=str(tmp_path), GENQ_MODEL="no-such-org/no-such-model-xyz")
    out = subprocess.run(
        [sys.executable, "-m", "cli", "worker"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "GENQ_MODEL" in out.stderr
    assert "local directory" in out.stderr
