"""`genq run` stopped with Ctrl-C, and `genq run` beside a worker already running.

Ctrl-C (SIGINT to its process group, as a terminal sends it) stops the run's own
worker at once: the jobs it was running go back to the queue with their attempts
uncounted, nothing starts after the signal, and a resume runs them as fresh jobs
(batched, attempt 1), not as suspects after their leases expire.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import get_engine, get_sessionmaker
from core.models import Job
from tests.integration.helpers import REPO, genq_env, genq_process, wait_until

pytestmark = pytest.mark.integration

MODEL = "fake:token_delay_s=0.02"  # 500 tokens: 10 s a job


def genq_run(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "run", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group, like a terminal's foreground job
            # Ctrl-C as a terminal gives it, whatever the suite inherited: a shell's
            # background job starts with SIGINT ignored, and so would genq run.
            preexec_fn=_default_sigint,
        )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def by_status(url: str) -> dict[str, int]:
    try:
        with get_engine(url).connect() as conn:
            rows = conn.execute(select(Job.status, func.count()).group_by(Job.status))
            return {str(status): int(n) for status, n in rows}
    except Exception:  # the schema is not made yet
        return {}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_hands_running_jobs_back_uncounted_and_the_resume_runs_them_fresh(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = genq_env(GENQ_DATA_DIR=str(data), GENQ_MODEL=MODEL, GENQ_MAX_BATCH_SIZE="8")
    n = 40  # 16 run at once; each takes 10 s, far longer than it takes to stop
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(n)))
    output = tmp_path / "out.jsonl"
    args = [str(prompts), "-o", str(output), "--max-tokens", "500"]
    url = f"sqlite:///{data / 'genq.db'}"
    log = tmp_path / "run.log"

    def running() -> set[str]:
        try:
            with get_engine(url).connect() as conn:
                return set(conn.scalars(select(Job.id).where(Job.status == "running")))
        except Exception:  # the schema is not made yet
            return set()

    first = genq_run(args, env, log)
    try:
        at_signal = wait_until(
            lambda: (ids := running()) and len(ids) >= 16 and ids, 120, "16 running", log
        )
        signalled_at = dt.datetime.now(dt.UTC)
        t0 = time.monotonic()
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
        code = first.wait(timeout=120)  # an upper bound, not a timing assertion
        stop_s = time.monotonic() - t0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    text = log.read_text()
    assert code == 130, text
    assert "interrupted" in text and "run the same command again to resume" in text
    worker_pid = int(re.search(r"started a local worker \(pid (\d+)", text).group(1))  # type: ignore[union-attr]
    assert not alive(worker_pid), "the run's worker outlived it"

    with get_sessionmaker(url)() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
    assert not [j for j in jobs.values() if j.status == "running"], "jobs left running"
    # What ran at Ctrl-C went back to the queue at once (not finished during a grace,
    # not left to its lease), its attempt not counted; nothing else started.
    handed_back = [jobs[i] for i in at_signal]
    assert all(j.status == "queued" and j.attempts == 0 for j in handed_back), [
        (j.status, j.attempts) for j in handed_back
    ]
    assert all(j.status == "queued" and j.attempts == 0 for j in jobs.values())
    assert all(j.started_at is None for j in jobs.values())

    t0 = time.monotonic()
    second = genq_run(args, env, log)
    assert second.wait(timeout=300) == 0, log.read_text()
    resume_s = time.monotonic() - t0
    with get_sessionmaker(url)() as session:
        done = list(session.scalars(select(Job)))
    assert {job.status for job in done} == {"succeeded"}
    assert {job.attempts for job in done} == {1}, "a handed-back job was counted or retried"
    assert all(_utc(job.started_at) > signalled_at for job in done)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == n
    print(
        f"\nCtrl-C to exit: {stop_s:.1f} s, {len(handed_back)} running jobs handed back; "
        f"resume: {resume_s:.1f} s in all, generating {n / _span(done):.2f} jobs/s "
        f"(16 at a time, 10 s each: {n / (math.ceil(n / 16) * 10):.2f} jobs/s at best)"
    )


def _utc(moment: dt.datetime | None) -> dt.datetime:
    assert moment is not None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _span(jobs: list[Job]) -> float:
    """Seconds from the first start to the last finish among ``jobs``."""
    start = min(job.started_at for job in jobs if job.started_at)
    end = max(job.finished_at for job in jobs if job.finished_at)
    return max((end - start).total_seconds(), 1e-9)


def test_genq_run_uses_a_worker_already_serving_its_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = genq_env(GENQ_DATA_DIR=str(data), GENQ_MODEL="fake", GENQ_WORKER_HEARTBEAT_S="1")
    url = f"sqlite:///{data / 'genq.db'}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(20)))
    output = tmp_path / "out.jsonl"
    worker_log, log = tmp_path / "worker.log", tmp_path / "run.log"
    with genq_process(["worker", "--hostname", "resident@here"], env, worker_log):

        def registered() -> bool:
            try:
                with get_engine(url).connect() as conn:
                    return bool(conn.exec_driver_sql("SELECT count(*) FROM worker_node").scalar())
            except Exception:
                return False

        wait_until(registered, 120, "the worker registered", worker_log)
        run = genq_run([str(prompts), "-o", str(output)], env, log)
        assert run.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert "using the running worker" in text and "fake" in text
    assert "started a local worker" not in text
    with get_sessionmaker(url)() as session:
        assert set(session.scalars(select(Job.worker))) == {"resident@here"}
    assert len(output.read_text().splitlines()) == 20


def test_genq_run_starts_a_worker_serving_the_model_under_its_served_name(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = genq_env(GENQ_DATA_DIR=str(data), GENQ_MODEL="fake", GENQ_MODEL_NAME="tiny-stories")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(5)))
    log = tmp_path / "run.log"
    run = genq_run([str(prompts), "-o", str(tmp_path / "out.jsonl")], env, log)
    assert run.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert "started a local worker" in text
    # Progress lines written where stderr is no terminal carry the elapsed time too.
    assert re.search(r"done 5/5  failed 0  .* elapsed \d+:\d\d", text), text
    with get_sessionmaker(f"sqlite:///{data / 'genq.db'}")() as session:
        assert set(session.scalars(select(Job.model))) == {"tiny-stories"}
        assert set(session.scalars(select(Job.status))) == {"succeeded"}
