"""Messages arriving together are claimed in one statement, each thread getting back
exactly its own jobs (worker.claims), and through the runtime on a real database."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
    statement's ids. Ids starting with ``s`` are suspects; ``gone`` ones are skipped; a
    statement holding ``poison`` fails (an id the database cannot take)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.statements: list[list[str]] = []
        self.fail_next = False
        self.poison = "poison"

    def __call__(self, ids: list[str]) -> tuple[list[Any], list[str]]:
        self.statements.append(list(ids))
        if len(self.statements) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database down")
        if self.poison in ids:
            raise ValueError(f"the database cannot take {self.poison!r}")
        claims = [SimpleNamespace(job_id=i) for i in ids if i[0] not in "sg"]
        return claims, [i for i in ids if i.startswith("s")]  # type: ignore[return-value]


def _wait_for_waiters(claimer: GroupClaimer, n: int) -> None:
    deadline = time.monotonic() + 10
    while claimer.group.waiting < n:
        assert time.monotonic() < deadline, "the threads did not queue up"
        time.sleep(0.001)


@contextlib.contextmanager
def one_round_behind(
    first: list[str], later: list[list[str]], fake: BlockingClaims | None = None
) -> Iterator[tuple[BlockingClaims, GroupClaimer, Future[Any], list[Future[Any]]]]:
    """``first`` claims (its statement held open) while every message of ``later``
    queues up behind it; then its statement goes on. Yields the fake, the claimer and
    the futures of ``first`` and of ``later``."""
    fake = fake or BlockingClaims()
    claimer = GroupClaimer(fake)
    with ThreadPoolExecutor(len(later) + 1) as pool:
        head = pool.submit(claimer.claim, first)
        assert fake.entered.wait(10)
        rest = [pool.submit(claimer.claim, m) for m in later]
        _wait_for_waiters(claimer, len(later))
        fake.release.set()
        yield fake, claimer, head, rest


def test_messages_arriving_during_a_claim_are_claimed_together_each_getting_its_own() -> None:
    later = [["b1", "s1"], ["c1", "gone"], ["d1"], ["e1", "e2", "s2"]]
    with one_round_behind(["a1", "a2"], later) as (fake, claimer, head, rest):
        results = [head.result(10)] + [f.result(10) for f in rest]
    # Two statements, not five: the first, and one for all that came while it ran.
    assert fake.statements == [["a1", "a2"], ["b1", "s1", "c1", "gone", "d1", "e1", "e2", "s2"]]
    assert claimer.group.rounds == 2
    got = [([c.job_id for c in claims], suspects) for claims, suspects in results]
    assert got == [
        (["a1", "a2"], []),
        (["b1"], ["s1"]),
        (["c1"], []),
        (["d1"], []),
        (["e1", "e2"], ["s2"]),
    ]


def test_a_job_in_two_messages_of_one_round_is_claimed_for_one_of_them() -> None:
    with one_round_behind(["x"], [["dup", "y"], ["dup"]]) as (fake, _, head, twins):
        head.result(10)
        claimed = [[c.job_id for c in f.result(10)[0]] for f in twins]
    assert sorted(fake.statements[1]) == ["dup", "y"]  # each id once in the statement
    # The duplicate is claimed for one message only (the other skips it, as it would
    # alone, finding the job already running); "y" goes to its own message.
    assert sum(ids.count("dup") for ids in claimed) == 1
    assert "y" in claimed[0]


def test_a_failed_claim_fails_its_message_and_the_next_round_claims_again() -> None:
    failing = BlockingClaims()
    failing.fail_next = True  # the first statement fails
    with one_round_behind(["a"], [["a"]], failing) as (_, claimer, head, rest):
        with pytest.raises(RuntimeError, match="database down"):
            head.result(10)
        # The thread that waited led its own round, which worked again.
        assert [c.job_id for c in rest[0].result(10)[0]] == ["a"]
    later, _ = claimer.claim(["b"])
    assert [c.job_id for c in later] == ["b"]


def test_a_statement_failing_on_one_message_of_a_round_fails_that_message_only() -> None:
    messages = [["b1", "s1"], ["poison", "c1"], ["d1"]]
    with one_round_behind(["a"], messages) as (fake, _, head, rest):
        assert [c.job_id for c in head.result(10)[0]] == ["a"]
        # One request may fail only itself: the statement of the round failed on
        # "poison", and only the message carrying it fails; the others are claimed.
        with pytest.raises(ValueError, match="poison"):
            rest[1].result(10)
        claims, suspects = rest[0].result(10)
        assert ([c.job_id for c in claims], suspects) == (["b1"], ["s1"])
        assert [c.job_id for c in rest[2].result(10)[0]] == ["d1"]
    assert ["b1", "s1", "poison", "c1", "d1"] in fake.statements  # they were grouped


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


def test_a_message_whose_ids_the_database_rejects_fails_alone_through_the_runtime(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL takes no NUL in a text value, so a message carrying such an id fails
    # its claim statement (SQLite takes it: the id is merely unknown, skipped). The
    # messages claimed in the same statement must not fail with it.
    runtime = WorkerRuntime(settings, FakeEngine(max_prompt_words=20, token_delay_s=0.0))
    real = runtime._claim_fresh
    entered, release = threading.Event(), threading.Event()

    def first_waits(worker: str, ids: list[str]) -> Any:
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        return real(worker, ids)

    monkeypatch.setattr(runtime, "_claim_fresh", first_waits)
    try:
        ids = [submit_prompt(client, max_new_tokens=2) for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(runtime.run_jobs, [ids[0]], worker="w1")
            assert entered.wait(10)
            bad = pool.submit(runtime.run_jobs, [ids[1], "bad\x00id"], worker="w1")
            good = pool.submit(runtime.run_jobs, [ids[2]], worker="w1")
            _wait_for_waiters(runtime._claimer("w1"), 2)
            release.set()
            assert first.result(10) == {ids[0]: "succeeded"}
            assert good.result(10) == {ids[2]: "succeeded"}
            if settings.resolved_database_url.startswith("postgresql"):
                with pytest.raises(Exception, match="NUL"):
                    bad.result(10)
                assert client.get(f"/v1/jobs/{ids[1]}").json()["status"] == "queued"
            else:
                assert bad.result(10) == {ids[1]: "succeeded", "bad\x00id": "skipped"}
    finally:
        runtime.close()


def test_results_stored_at_the_same_moment_are_stored_in_one_transaction_each_once(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first store is held open while the other messages finish: their results
    # are stored together in the next round, and each job ends stored once.
    runtime = WorkerRuntime(settings, FakeEngine(max_prompt_words=20, token_delay_s=0.0))
    real = runtime._store_outcomes
    entered, release = threading.Event(), threading.Event()
    stores: list[int] = []

    def first_waits(outcomes: list[Any]) -> list[bool]:
        stores.append(len(outcomes))
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        return real(outcomes)

    monkeypatch.setattr(runtime, "_store_outcomes", first_waits)
    runtime._storers[False]._fn = first_waits  # the group commit was made with the real one
    try:
        ids = [submit_prompt(client, max_new_tokens=2) for _ in range(9)]
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(runtime.run_jobs, ids[:1], worker="w1")
            assert entered.wait(10)
            rest = [
                pool.submit(runtime.run_jobs, ids[i : i + 2], worker="w1") for i in (1, 3, 5, 7)
            ]
            deadline = time.monotonic() + 10
            while runtime._storers[False].waiting < 4:
                assert time.monotonic() < deadline, "the stores did not queue up"
                time.sleep(0.001)
            release.set()
            results = [first.result(10)] + [f.result(10) for f in rest]
        # The four messages that stored meanwhile went in one transaction (a
        # message's second job may have finished after its first was stored).
        assert stores[0] == 1 and stores[1] >= 4 and sum(stores) == 9, stores
        assert {k: v for r in results for k, v in r.items()} == dict.fromkeys(ids, "succeeded")
        for job_id in ids:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded" and job["output"], job
    finally:
        runtime.close()


def test_a_web_apps_job_is_stored_while_a_batchs_store_is_held(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # High and express messages have their own claim and store rounds: a batch's
    # store that takes long (a big round on a busy worker) does not hold them.
    runtime = WorkerRuntime(settings, FakeEngine(max_prompt_words=20, token_delay_s=0.0))
    real = runtime._store_outcomes
    entered, release = threading.Event(), threading.Event()

    def batch_store_waits(outcomes: list[Any]) -> list[bool]:
        entered.set()
        assert release.wait(10)
        return real(outcomes)

    runtime._storers[False]._fn = batch_store_waits
    try:
        bulk, web = (submit_prompt(client, max_new_tokens=2) for _ in range(2))
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(runtime.run_jobs, [bulk], worker="w1", queue="genq.m.low")
            assert entered.wait(10)
            express = runtime.run_jobs([web], worker="w1", queue="genq.m.express")
            assert express == {web: "succeeded"}
            assert not held.done()
            release.set()
            assert held.result(10) == {bulk: "succeeded"}
    finally:
        release.set()
        runtime.close()
