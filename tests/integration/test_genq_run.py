"""`genq run` as a user runs it: a real process starting its own local worker on the
embedded default; killed halfway and run again, it resumes without regenerating."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import get_engine, get_sessionmaker
from core.models import Batch, Job
from tests.integration.helpers import REPO, genq_env, wait_until
from tests.tiny_model import tiny_model_dir

pytestmark = pytest.mark.integration


def genq_run(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "run", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group: the test kills run and worker
        )


def test_genq_run_on_1000_prompts_killed_halfway_resumes_without_regenerating(
    tmp_path: Path,
) -> None:
    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data"
    env = genq_env(
        GENQ_DATA_DIR=str(data),
        GENQ_MODEL=str(model),
        GENQ_MAX_BATCH_SIZE="32",
        GENQ_LEASE_S="4",  # the killed worker's jobs come back soon
        GENQ_SWEEP_INTERVAL_S="1",
    )
    n = 1000
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Once upon a time, there was a {i}\n" for i in range(n)))
    output = tmp_path / "out.jsonl"
    args = [str(prompts), "-o", str(output), "--max-tokens", "6"]
    url = f"sqlite:///{data / 'genq.db'}"

    def succeeded() -> int:
        if not (data / "genq.db").exists():
            return 0
        try:
            with get_engine(url).connect() as conn:
                query = select(func.count()).select_from(Job).where(Job.status == "succeeded")
                return conn.scalar(query) or 0
        except Exception:  # the schema is not made yet
            return 0

    log = tmp_path / "run.log"
    first = genq_run(args, env, log)
    try:
        wait_until(lambda: succeeded() >= n // 2 or first.poll() is not None, 300, "half", log)
    finally:
        # genq run and its worker (in a session of its own), mid-flight
        worker = re.search(r"started a local worker \(pid (\d+)", log.read_text())
        os.killpg(first.pid, signal.SIGKILL)
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(worker.group(1)), signal.SIGKILL)
        first.wait()
    killed_at = dt.datetime.now(dt.UTC)
    assert not output.exists()
    with get_sessionmaker(url)() as session:
        before = {
            job.custom_id: (job.id, job.finished_at, job.attempts, job.outputs)
            for job in session.scalars(select(Job).where(Job.status == "succeeded"))
        }
    assert n // 2 <= len(before) < n, len(before)

    second = subprocess.run(
        [sys.executable, "-m", "cli", "run", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    print(
        f"\nfirst run: {len(before)} of {n} done when killed; second run:\n{second.stderr[-600:]}"
    )
    assert "resuming batch" in second.stderr
    assert f"{len(before)} of {n} already done" in second.stderr
    assert f"done {n}/{n}" in second.stderr and "tokens/s" in second.stderr
    assert f"wrote {n} lines" in second.stdout

    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"line-{i + 1}" for i in range(n)]
    assert all(x["error"] is None for x in lines)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 6 for x in lines)

    with get_sessionmaker(url)() as session:
        assert session.scalar(select(func.count()).select_from(Batch)) == 1
        jobs = list(session.scalars(select(Job)))
    assert len(jobs) == n and all(job.status == "succeeded" for job in jobs)
    after = {job.custom_id: job for job in jobs}
    for custom_id, (job_id, finished_at, attempts, outputs) in before.items():
        job = after[custom_id]
        assert (job.id, job.finished_at, job.attempts, job.outputs) == (
            job_id,
            finished_at,
            attempts,
            outputs,
        ), f"{custom_id} was generated again"
    regenerated = [j for j in jobs if j.finished_at is not None and j.finished_at > killed_at]
    print(f"generated in the second run: {len(regenerated)} (remainder {n - len(before)})")
    assert len(regenerated) == n - len(before)
    by_line = {x["custom_id"]: x["response"]["body"]["choices"][0]["text"] for x in lines}
    assert all(by_line[c] == o[3][0] for c, o in before.items())

    third = subprocess.run(
        [sys.executable, "-m", "cli", "run", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert third.returncode == 0 and f"{n} of {n} already done" in third.stderr
    assert "started a local worker" not in third.stderr


def test_genq_run_plain_and_openai_jsonl_and_bad_lines(tmp_path: Path) -> None:
    env = genq_env(GENQ_DATA_DIR=str(tmp_path / "data"), GENQ_MODEL="fake")
    plain = tmp_path / "plain.jsonl"
    rows = [
        {"prompt": "one two three", "max_new_tokens": 2},
        {"prompt": "four five", "custom_id": "mine"},
        {
            "custom_id": "oa",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "fake", "prompt": "six seven", "max_tokens": 1},
        },
    ]
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "run", str(plain), "-o", str(output), "--max-tokens", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["line-1", "mine", "oa"]
    texts = [x["response"]["body"]["choices"][0]["text"] for x in lines]
    assert texts == [" three two", " five four five", " seven"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "ok"}) + "\n"
        + "{nope\n"
        + json.dumps({"prompt": "x", "top_p": 7}) + "\n"
        + json.dumps({"prompt": "x", "custom_id": "line-1"}) + "\n"
        + json.dumps({"prompt": "x", "model": "gpt-99"}) + "\n"
        + json.dumps({"prompt": "x", "frobnicate": 1}) + "\n"
    )  # fmt: skip
    failed = subprocess.run(
        [sys.executable, "-m", "cli", "run", str(bad), "-o", str(tmp_path / "o.jsonl")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "nothing was queued" in failed.stderr
    for expected in (
        "line 2: invalid_json_line",
        "line 3: invalid_request (top_p)",
        "line 4: duplicate_custom_id",
        "line 5: model_not_found",
        "line 6: invalid_request (frobnicate)",
    ):
        assert expected in failed.stderr, failed.stderr
    assert not (tmp_path / "o.jsonl").exists()
