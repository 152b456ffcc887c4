"""While a web app's jobs are about, a worker's bulk rounds (the other jobs' claims and
stores, the feeder's top-ups) pause after each round, and the web app's own never do
(worker.pacing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.settings import Settings
from tests.conftest import submit_prompt
from tests.unit.test_feed import CountingQueue, make_batch, make_settings
from worker.engine.fake import FakeEngine
from worker.feeder import Feeder
from worker.pacing import MAX_PAUSE_S, URGENT_WINDOW_S, BulkPacer
from worker.runtime import WorkerRuntime


class Clock:
    """A clock that moves only when told; sleeping moves it too."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def pacer(share: float = 0.25) -> tuple[BulkPacer, Clock]:
    clock = Clock()
    return BulkPacer(share, clock=clock, sleep=clock.sleep), clock


def test_bulk_work_never_pauses_while_no_urgent_job_is_about() -> None:
    bulk, clock = pacer()
    assert bulk.pause_after(0.1) == 0
    assert clock.sleeps == []


def test_bulk_work_takes_its_share_of_the_time_while_an_urgent_job_runs_and_just_after() -> None:
    bulk, clock = pacer(0.25)
    with bulk.urgent():
        assert bulk.pause_after(0.01) == pytest.approx(0.03)  # 1/4 of the time: 3x the round
        clock.now += 60  # however long the urgent job runs
        assert bulk.pause_after(0.02) == pytest.approx(0.06)
    clock.now += URGENT_WINDOW_S - 0.01  # a web app's next job is likely soon
    assert bulk.pause_after(0.01) == pytest.approx(0.03)
    clock.now += 0.02  # and none came: full speed again
    assert bulk.pause_after(0.01) == 0
    assert clock.sleeps == pytest.approx([0.03, 0.06, 0.03])
    assert bulk.paused_s == pytest.approx(0.12)


def test_a_long_round_pauses_at_most_the_cap_and_share_one_never_pauses() -> None:
    bulk, _ = pacer(0.25)
    with bulk.urgent():
        assert bulk.pause_after(10.0) == MAX_PAUSE_S
    full, clock = pacer(1.0)
    with full.urgent():
        assert full.pause_after(1.0) == 0
    assert clock.sleeps == []


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        BulkPacer(share)
    with pytest.raises(ValidationError, match="bulk_share"):
        Settings(bulk_share=share)


def test_a_paced_call_answers_as_the_call_and_pauses_after_it_even_when_it_raises() -> None:
    bulk, clock = pacer(0.5)

    def round_of(seconds: float) -> str:
        clock.now += seconds
        if seconds > 1:
            raise RuntimeError("database down")
        return "stored"

    paced = bulk.paced(round_of)
    with bulk.urgent():
        assert paced(0.04) == "stored"
        with pytest.raises(RuntimeError, match="database down"):
            paced(2.0)
    assert clock.sleeps == pytest.approx([0.04, MAX_PAUSE_S])


def recording_pacer() -> tuple[BulkPacer, list[float]]:
    """A pacer on the real clock whose pauses are recorded, not slept."""
    pauses: list[float] = []
    return BulkPacer(0.25, sleep=pauses.append), pauses


def test_a_workers_bulk_claims_and_stores_pause_while_a_web_apps_job_is_about_its_own_do_not(
    client: TestClient, settings: Settings
) -> None:
    bulk, pauses = recording_pacer()
    runtime = WorkerRuntime(
        settings, FakeEngine(max_prompt_words=20, token_delay_s=0.0), pacer=bulk
    )
    try:
        first, web, second = (submit_prompt(client, max_new_tokens=2) for _ in range(3))
        assert runtime.run_jobs([first], worker="w1", queue="genq.fake.low") == {first: "succeeded"}
        assert pauses == []  # no web app about: the batch runs at full speed
        assert runtime.run_jobs([web], worker="w1", queue="genq.fake.express") == {web: "succeeded"}
        assert pauses == []  # the web app's own claim and store never pause
        assert runtime.run_jobs([second], worker="w1", queue="genq.fake.low") == {
            second: "succeeded"
        }
        # Within the window after the web app's job: the batch's claim and its store
        # each paused after their round, 3x the round (a share of 1/4).
        assert len(pauses) == 2 and all(0 < p <= MAX_PAUSE_S for p in pauses), pauses
    finally:
        runtime.close()


def test_the_feeders_top_up_pauses_while_a_web_apps_job_is_about(
    database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, tmp_path)
    _, ids = make_batch(settings)
    bulk, pauses = recording_pacer()
    queue = CountingQueue()
    feeder = Feeder(settings, queue, holder="w1", pacer=bulk)  # type: ignore[arg-type]
    feeder.tick()
    assert pauses == [] and len(queue.sent) > 0
    queue.drain(len(queue.waiting))
    with bulk.urgent():
        feeder.tick()
    assert len(pauses) == 1 and 0 < pauses[0] <= MAX_PAUSE_S
    assert queue.sent == ids[: len(queue.sent)]  # still every job once, in order
