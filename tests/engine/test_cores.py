"""The engine's threads follow the CPUs other processes leave idle (worker/engine/cores.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch

from tests.engine.helpers import request
from worker.engine.batching import BatchingEngine
from worker.engine.cores import IdleCores, Sample, read_sample


def _samples(*samples: Sample | None) -> Any:
    queue = list(samples)
    return lambda: queue.pop(0)


def test_a_process_busy_on_one_of_two_cores_leaves_one_thread() -> None:
    # Over 0.5 s: 0.9 CPU-seconds in all, 0.4 of them this process's: others held 1 core.
    cores = IdleCores(2, cpus=2, sample=_samples(Sample(0, 0, 0), Sample(0.9, 0.4, 0.5)))
    assert cores.threads() == 1


def test_idle_cores_are_all_used() -> None:
    cores = IdleCores(2, cpus=2, sample=_samples(Sample(0, 0, 0), Sample(0.9, 0.85, 0.5)))
    assert cores.threads() == 2


def test_never_more_than_configured_nor_fewer_than_one() -> None:
    idle = IdleCores(4, cpus=16, sample=_samples(Sample(0, 0, 0), Sample(0, 0, 1)))
    assert idle.threads() == 4
    full = IdleCores(4, cpus=16, sample=_samples(Sample(0, 0, 0), Sample(20, 0, 1)))
    assert full.threads() == 1


def test_a_decision_holds_until_its_window_ends() -> None:
    cores = IdleCores(
        2,
        cpus=2,
        sample=_samples(
            Sample(0, 0, 0), Sample(0.9, 0.4, 0.5), Sample(0.9, 0.4, 0.6), Sample(1.8, 1.7, 1.0)
        ),
    )
    assert cores.threads() == 1  # 0 -> 0.5 s: one core held by others
    assert cores.threads() == 1  # 0.1 s later: too soon to tell
    assert cores.threads() == 2  # 0.5 -> 1.0 s: the others went quiet


def test_without_proc_the_configured_threads_stay() -> None:
    assert IdleCores(2, cpus=2, sample=lambda: None).threads() == 2


@pytest.mark.skipif(read_sample() is None, reason="no /proc here")
def test_a_real_busy_process_is_seen() -> None:
    cores = IdleCores(2, cpus=2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # the hog starts
        cores.threads()
        time.sleep(0.6)
        assert cores.threads() == 1
    finally:
        hog.kill()
        hog.wait()


class _Fixed:
    def __init__(self, threads: int) -> None:
        self.answer = threads

    def threads(self) -> int:
        return self.answer


@pytest.mark.parametrize("idle", [1, 2])
def test_the_engine_runs_each_forward_with_the_threads_left_idle(gpt2: Any, idle: int) -> None:
    model, tokenizer, info = gpt2
    seen: list[int] = []

    def record(*_: Any) -> None:
        if threading.current_thread().name == "genq-engine":
            seen.append(torch.get_num_threads())

    hook = model.transformer.h[0].register_forward_hook(record)
    engine = BatchingEngine(model, tokenizer, info, threads=2, share_cores=True, fast_decode=False)
    try:
        engine._cores = _Fixed(idle)  # type: ignore[assignment]
        engine.submit(request("Once upon a time", max_new_tokens=3)).result(timeout=60)
    finally:
        engine.close()
        hook.remove()
    assert seen and set(seen) == {idle}
