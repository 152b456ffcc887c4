"""While a web app's jobs are about, a worker's bulk rounds (the other jobs' claims and
stores) wait before each round for the pause the last one owes, and the web app's own
never do (worker.pacing)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.db import session_scope
from core.models import Job
from core.settings import Settings
from tests.conftest import submit_prompt
from worker.engine.fake import FakeEngine
from worker.pacing import MAX_PAUSE_S, URGENT_WINDOW_S, BulkPacer
from worker.runtime import WorkerRuntime


class Clock:
    """A clock that moves only when told; sleeping moves it too."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def round_of(self, seconds: float) -> Callable[[], str]:
        """A round that takes ``seconds`` on this clock."""

        def run() -> str:
            self.now += seconds
            return "done"

        return run

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def pacer(share: float = 0.25) -> tuple[BulkPacer, Clock]:
    clock = Clock()
    return BulkPacer(share, clock=clock, sleep=clock.sleep), clock


P = ParamSpec("P")
R = TypeVar("R")


def test_bulk_rounds_never_pause_while_no_urgent_job_is_about() -> None:
    bulk, clock = pacer()
    paced = bulk.paced(clock.round_of(0.1))
    assert [paced(), paced(), paced()] == ["done"] * 3
    assert clock.sleeps == []


def test_back_to_back_bulk_rounds_take_their_share_while_an_urgent_job_runs_and_just_after() -> (
    None
):
    bulk, clock = pacer(0.25)
    paced = bulk.paced(clock.round_of(0.01))
    with bulk.urgent():
        paced()  # the first round owes nothing yet
        paced()  # waits 3x the last round: 1/4 of the time
        clock.now += 60  # however long the urgent job runs
        paced()  # the last round ended long ago: nothing left to wait
        paced()
    clock.now += URGENT_WINDOW_S - 0.02  # a web app's next job is likely soon
    paced()  # owed 0.03, 1.98 s passed: none
    paced()
    clock.now += URGENT_WINDOW_S  # and none came: full speed again
    paced()
    paced()
    assert clock.sleeps == pytest.approx([0.03, 0.03, 0.03])
    assert bulk.paused_s == pytest.approx(0.09)


def test_a_long_round_owes_at_most_the_cap_and_share_one_never_pauses() -> None:
    bulk, clock = pacer(0.25)
    paced = bulk.paced(clock.round_of(10.0))
    with bulk.urgent():
        paced()
        paced()
    assert clock.sleeps == [MAX_PAUSE_S]
    full, clock = pacer(1.0)
    paced = full.paced(clock.round_of(1.0))
    with full.urgent():
        paced()
        paced()
    assert clock.sleeps == []


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        BulkPacer(share)
    with pytest.raises(ValidationError, match="bulk_share"):
        Settings(bulk_share=share)


def test_a_round_that_raised_owes_no_pause() -> None:
    bulk, clock = pacer(0.5)

    def failing() -> str:
        clock.now += 2.0
        raise RuntimeError("database down")

    paced_fail, paced_ok = bulk.paced(failing), bulk.paced(clock.round_of(0.04))
    with bulk.urgent():
        with pytest.raises(RuntimeError, match="database down"):
            paced_fail()
        with pytest.raises(RuntimeError, match="database down"):
            paced_fail()  # no pause after a failure: it is retried at once
        paced_ok()
        paced_ok()
    assert clock.sleeps == pytest.approx([0.04])


class SpyPacer(BulkPacer):
    """Records each paced round by name, and whether an urgent block was open."""

    def __init__(self) -> None:
        super().__init__(0.25)
        self.rounds: list[str] = []
        self.urgent_blocks = 0

    def paced(self, fn: Callable[P, R]) -> Callable[P, R]:
        name = getattr(fn, "__name__", None) or fn.func.__name__  # type: ignore[attr-defined]

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            self.rounds.append(name)
            return fn(*args, **kwargs)

        return call

    @contextmanager
    def urgent(self) -> Iterator[None]:
        self.urgent_blocks += 1
        yield


@pytest.fixture
def spied(settings: Settings) -> Iterator[tuple[WorkerRuntime, SpyPacer]]:
    spy = SpyPacer()
    runtime = WorkerRuntime(settings, FakeEngine(max_prompt_words=20, token_delay_s=0.0), pacer=spy)
    yield runtime, spy
    runtime.close()


def test_a_batchs_claims_and_stores_are_paced_a_web_apps_are_not(
    client: TestClient, spied: tuple[WorkerRuntime, SpyPacer]
) -> None:
    runtime, spy = spied
    bulk, web, high = (submit_prompt(client, max_new_tokens=2) for _ in range(3))
    assert runtime.run_jobs([bulk], worker="w1", queue="genq.fake.low") == {bulk: "succeeded"}
    assert spy.rounds == ["_claim_fresh", "_store_outcomes"] and spy.urgent_blocks == 0
    spy.rounds.clear()
    assert runtime.run_jobs([web], worker="w1", queue="genq.fake.express") == {web: "succeeded"}
    assert runtime.run_jobs([high], worker="w1", queue="genq.fake.high") == {high: "succeeded"}
    # The web app's jobs mark the worker urgent, and their own rounds are not paced.
    assert spy.rounds == [] and spy.urgent_blocks == 2


def test_a_suspect_run_alone_is_stored_without_a_pause(
    client: TestClient, settings: Settings, spied: tuple[WorkerRuntime, SpyPacer]
) -> None:
    # A suspect holds the worker's exclusive lock, which every other message (a web
    # app's too) waits for: its store must not pause.
    runtime, spy = spied
    job_id = submit_prompt(client, max_new_tokens=2)
    with session_scope(settings.resolved_database_url) as session:
        session.get(Job, job_id).attempts = 1  # its worker died once: a suspect
    assert runtime.run_jobs([job_id], worker="w1", queue="genq.fake.low") == {job_id: "succeeded"}
    assert spy.rounds == ["_claim_fresh"]  # the group claim found it a suspect; no paced store


def test_a_worker_shutting_down_stops_pausing(settings: Settings) -> None:
    runtime = WorkerRuntime(
        settings.model_copy(update={"bulk_share": 0.01}),
        FakeEngine(max_prompt_words=20, token_delay_s=0.0),
    )
    try:
        with runtime.pacer.urgent():
            waiting = threading.Thread(
                target=runtime.pacer.wait_until, args=(time.monotonic() + 600,)
            )
            waiting.start()
            runtime._draining.set()  # as shutdown does
            waiting.join(10)
            assert not waiting.is_alive(), "a pause outlived the worker's shutdown"
    finally:
        runtime.close()
