"""A worker's job slots (worker.isolation.JobSlots): a message takes its jobs' slots
together, and freed slots go to the message from the queue read first."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from core.queue import CONSUME_ORDER, lane_rank, queue_name
from worker.isolation import JobSlots

HIGH, EXPRESS, NORMAL, LOW = (lane_rank(queue_name("genq", "gpt2", lane)) for lane in CONSUME_ORDER)


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_lanes_rank_in_the_order_workers_read_their_queues() -> None:
    assert (HIGH, EXPRESS, NORMAL, LOW) == (0, 1, 2, 3)
    # A queue of no known lane (a hand-made -Q, the embedded broker) ranks as normal.
    assert lane_rank(None) == lane_rank("custom") == NORMAL


def test_a_message_of_a_later_queue_waits_while_one_of_an_earlier_queue_needs_the_slots() -> None:
    slots = JobSlots(2)
    order: list[str] = []
    release = threading.Event()

    def take(name: str, count: int, rank: int) -> None:
        with slots.hold(count, rank=rank):
            order.append(name)
            assert release.wait(10)

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(take, "running", 1, LOW)
        _wait_for(lambda: order == ["running"], "the first message")
        # One slot is free, but the express message needs two: it waits for them,
        # and the batch message that would fit in the free one waits behind it.
        express = pool.submit(take, "express", 2, EXPRESS)
        _wait_for(lambda: slots.waiting == 1, "the express message to wait")
        batch = pool.submit(take, "batch", 1, NORMAL)
        _wait_for(lambda: slots.waiting == 2, "the batch message to wait")
        time.sleep(0.05)
        assert order == ["running"]
        release.set()
        for future in (first, express, batch):
            future.result(10)
    assert order == ["running", "express", "batch"]


def test_messages_of_one_queue_take_free_slots_as_they_fit() -> None:
    slots = JobSlots(3)
    with slots.hold(2, rank=NORMAL), slots.hold(1, rank=NORMAL):
        assert slots.waiting == 0
    with slots.hold(5, rank=LOW):  # more than the capacity: all of it
        assert slots.waiting == 0


def test_reserved_slots_are_kept_for_high_and_express_messages() -> None:
    slots = JobSlots(10, reserved=2, urgent_rank=EXPRESS)
    release = threading.Event()
    taken: list[str] = []

    def take(name: str, count: int, rank: int) -> None:
        with slots.hold(count, rank=rank):
            taken.append(name)
            assert release.wait(10)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(take, "batch", 8, NORMAL)]
        _wait_for(lambda: taken == ["batch"], "the batch message")
        futures.append(pool.submit(take, "more batch", 1, LOW))
        _wait_for(lambda: slots.waiting == 1, "the next batch message to wait")
        # Two slots are free, but only for a web app's messages.
        futures.append(pool.submit(take, "express", 1, EXPRESS))
        futures.append(pool.submit(take, "high", 1, HIGH))
        _wait_for(lambda: sorted(taken) == ["batch", "express", "high"], "the urgent messages")
        assert slots.waiting == 1
        release.set()
        for future in futures:
            future.result(10)
    assert taken[-1] == "more batch"


def test_slots_given_back_early_let_a_waiting_message_in_and_are_not_given_back_twice() -> None:
    slots = JobSlots(3)
    entered = threading.Event()

    def later() -> None:
        with slots.hold(2, rank=NORMAL):
            entered.set()

    with slots.hold(3, rank=NORMAL) as held, ThreadPoolExecutor(1) as pool:
        future = pool.submit(later)
        _wait_for(lambda: slots.waiting == 1, "the next message to wait")
        held.keep(2)  # one of its jobs is done
        time.sleep(0.05)
        assert not entered.is_set()  # one free slot: the message needs two
        held.keep(1)
        assert entered.wait(10)
        future.result(10)
        held.keep(3)  # never more than it took
        assert held.count == 1
        held.keep(0)  # all done: what it still holds goes back (and again on leaving: nothing)
        assert held.count == 0
    assert slots._used == 0
    with slots.hold(3, rank=NORMAL):  # all of them free again, no more
        assert slots._used == 3


def test_a_message_larger_than_the_capacity_holds_it_all_until_its_running_jobs_fit() -> None:
    slots = JobSlots(2)
    with slots.hold(4, rank=NORMAL) as held:  # 4 jobs, 2 slots: the whole capacity
        held.keep(3)  # one done, three still running: more than the capacity
        assert held.count == 2 and slots._used == 2
        held.keep(1)
        assert held.count == 1 and slots._used == 1
    assert slots._used == 0
