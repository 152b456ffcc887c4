"""Messages arriving together are claimed in one statement, each thread getting back
exactly its own jobs (worker.claims), and through the runtime on a real database."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from tests.conftest import submit_prompt
from worker.claims import GroupClaimer
from worker.engine.fake import FakeEngine
from worker.runtime import WorkerRuntime


class BlockingClaims:
    """A claim_fresh whose first call waits until ``release`` is set; records each
    statement's ids. Ids starting with ``s`` are suspects; ``gone`` ones are skipped."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.statements: list[list[str]] = []
        self.fail_next = False

    def __call__(self, ids: list[str]) -> tuple[list[Any], list[str]]:
        self.statements.append(list(ids))
        if len(self.statements) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database down")
        claims = [SimpleNamespace(job_id=i) for i in ids if i[0] not in "sg"]
        return claims, [i for i in ids if i.startswith("s")]  # type: ignore[return-value]


def _wait_for_waiters(claimer: GroupClaimer, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(claimer._waiting) < n:
        assert time.monotonic() < deadline, "the threads did not queue up"
        time.sleep(0.001)


def test_messages_arriving_during_a_claim_are_claimed_together_each_getting_its_own() -> None:
    fake = BlockingClaims()
    claimer = GroupClaimer(fake)
    messages = [["a1", "a2"], ["b1", "s1"], ["c1", "gone"], ["d1"], ["e1", "e2", "s2"]]
    with ThreadPoolExecutor(len(messages)) as pool:
        first = pool.submit(claimer.claim, messages[0])
        assert fake.entered.wait(10)
        rest = [pool.submit(claimer.claim, m) for m in messages[1:]]
        _wait_for_waiters(claimer, len(messages) - 1)
        fake.release.set()
        results = [first.result(10)] + [f.result(10) for f in rest]
    # Two statements, not five: the first, and one for all that came while it ran.
    assert fake.statements == [["a1", "a2"], ["b1", "s1", "c1", "gone", "d1", "e1", "e2", "s2"]]
    assert claimer.rounds == 2
    got = [([c.job_id for c in claims], suspects) for claims, suspects in results]
    assert got == [
        (["a1", "a2"], []),
        (["b1"], ["s1"]),
        (["c1"], []),
        (["d1"], []),
        (["e1", "e2"], ["s2"]),
    ]


def test_a_job_in_two_messages_of_one_round_is_claimed_for_one_of_them() -> None:
    fake = BlockingClaims()
    claimer = GroupClaimer(fake)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(claimer.claim, ["x"])
        assert fake.entered.wait(10)
        twins = [pool.submit(claimer.claim, ["dup", "y"]), pool.submit(claimer.claim, ["dup"])]
        _wait_for_waiters(claimer, 2)
        fake.release.set()
        first.result(10)
        claimed = [[c.job_id for c in f.result(10)[0]] for f in twins]
    assert sorted(fake.statements[1]) == ["dup", "y"]  # each id once in the statement
    # The duplicate is claimed for one message only (the other skips it, as it would
    # alone, finding the job already running); "y" goes to its own message.
    assert sum(ids.count("dup") for ids in claimed) == 1
    assert "y" in claimed[0]


def test_a_failed_claim_fails_every_message_of_its_round_and_only_those() -> None:
    fake = BlockingClaims()
    claimer = GroupClaimer(fake)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(claimer.claim, ["a"])
        assert fake.entered.wait(10)
        fake.fail_next = True
        waiting = pool.submit(claimer.claim, ["a"])  # queued behind the failing round
        _wait_for_waiters(claimer, 1)
        fake.release.set()
        with pytest.raises(RuntimeError, match="database down"):
            first.result(10)
        # The thread that waited led its own round, which worked again.
        assert [c.job_id for c in waiting.result(10)[0]] == ["a"]
    later, _ = claimer.claim(["b"])
    assert [c.job_id for c in later] == ["b"]


def test_many_messages_delivered_at_once_are_claimed_in_fewer_statements_each_job_once(
    client: TestClient, settings: Settings
) -> None:
    runtime = WorkerRuntime(settings, FakeEngine(max_prompt_words=20, token_delay_s=0.01))
    try:
        ids = [submit_prompt(client, max_new_tokens=2) for _ in range(24)]
        messages = [ids[i : i + 2] for i in range(0, 24, 2)] + [[ids[0]], [ids[5], ids[6]]]
        with ThreadPoolExecutor(len(messages)) as pool:
            results = list(pool.map(lambda m: runtime.run_jobs(m, worker="w1"), messages))
        statuses: dict[str, list[str]] = {}
        for result in results:
            for job_id, status in result.items():
                statuses.setdefault(job_id, []).append(status)
        # Every job ran once; its duplicate deliveries were skipped.
        assert all(s.count("succeeded") == 1 for s in statuses.values())
        assert sorted(statuses) == sorted(ids)
        for job_id in ids:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded" and job["attempts"] == 1
    finally:
        runtime.close()
