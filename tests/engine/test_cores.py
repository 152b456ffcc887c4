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
from worker.engine.cores import IdleCores, Sample, read_sample, usable_cpus


class FakeProc:
    """``/proc`` samples handed out one by one, and a clock the test sets."""

    def __init__(self, *samples: Sample | None) -> None:
        self.samples = list(samples)
        self.now = 0.0

    def sample(self, _cpus: set[int]) -> Sample | None:
        return self.samples.pop(0)

    def cores(self, most: int = 2, cpus: int = 2) -> IdleCores:
        return IdleCores(most, set(range(cpus)), sample=self.sample, clock=lambda: self.now)


def _after(proc: FakeProc, seconds: float) -> FakeProc:
    proc.now = seconds
    return proc


def test_a_process_busy_on_one_of_two_cores_leaves_one_thread() -> None:
    # Over 0.5 s: 0.9 CPU-seconds in all, 0.4 of them this process's: others held 1 core.
    proc = FakeProc(Sample(0, 0, 0), Sample(0.9, 0.4, 0.5))
    cores = proc.cores()
    assert _after(proc, 0.5) and cores.threads() == 1


def test_idle_cores_are_all_used() -> None:
    proc = FakeProc(Sample(0, 0, 0), Sample(0.9, 0.85, 0.5))
    cores = proc.cores()
    assert _after(proc, 0.5) and cores.threads() == 2


def test_never_more_than_configured_nor_fewer_than_one() -> None:
    idle = FakeProc(Sample(0, 0, 0), Sample(0, 0, 1))
    idle_cores = idle.cores(most=4, cpus=16)
    assert _after(idle, 1) and idle_cores.threads() == 4
    full = FakeProc(Sample(0, 0, 0), Sample(20, 0, 1))
    full_cores = full.cores(most=4, cpus=16)
    assert _after(full, 1) and full_cores.threads() == 1


def test_a_decision_holds_until_its_window_ends() -> None:
    proc = FakeProc(Sample(0, 0, 0), Sample(0.9, 0.4, 0.5), Sample(1.8, 1.25, 1.0))
    cores = proc.cores()
    assert _after(proc, 0.5) and cores.threads() == 1  # one core held by others
    assert _after(proc, 0.6) and cores.threads() == 1  # too soon to tell: /proc not read
    assert _after(proc, 1.0) and cores.threads() == 2  # 0.5 -> 1.0 s: the others went quiet
    assert proc.samples == []


def test_after_a_long_idle_the_next_window_is_judged_alone() -> None:
    # 0 -> 0.5 s: others held a core. Then an hour idle, then a busy-free 0.5 s.
    proc = FakeProc(
        Sample(0, 0, 0), Sample(0.9, 0.4, 0.5), Sample(3600, 10, 3600.5), Sample(3600, 10.4, 3601)
    )
    cores = proc.cores()
    assert _after(proc, 0.5) and cores.threads() == 1
    assert _after(proc, 3600.5) and cores.threads() == 1  # the hour is not averaged over
    assert _after(proc, 3601) and cores.threads() == 2


def test_counters_that_do_not_move_keep_the_threads() -> None:
    """gVisor's /proc/stat reports zeros: this process's time grows, the machine's not."""
    proc = FakeProc(Sample(0, 0, 0), Sample(0, 0.5, 0.5))
    cores = proc.cores()
    assert _after(proc, 0.5) and cores.threads() == 2
    assert _after(proc, 5) and cores.threads() == 2  # off for good: /proc not read again


def test_without_proc_the_configured_threads_stay() -> None:
    assert FakeProc(None).cores().threads() == 2


def _proc_counts_cpu_time() -> bool:
    everything = usable_cpus()
    first = read_sample(everything)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    second = read_sample(everything)
    return first is not None and second is not None and second.busy > first.busy


@pytest.mark.skipif(not _proc_counts_cpu_time(), reason="no /proc here, or it counts nothing")
def test_a_real_busy_process_on_a_cpu_of_ours_is_seen() -> None:
    cpus = sorted(usable_cpus())[:2]
    if len(cpus) < 2:
        pytest.skip("one CPU")
    cores = IdleCores(2, set(cpus))
    hog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os; os.sched_setaffinity(0, {{{cpus[0]}}})\nwhile True: pass",
        ]
    )
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


class _Broken:
    def threads(self) -> int:
        raise RuntimeError("no /proc today")


def test_a_failure_to_read_the_idle_cpus_fails_no_request(gpt2: Any) -> None:
    model, tokenizer, info = gpt2
    engine = BatchingEngine(model, tokenizer, info, threads=2, share_cores=True)
    try:
        engine._cores = _Broken()  # type: ignore[assignment]
        result = engine.submit(request("Once upon a time", max_new_tokens=3)).result(timeout=60)
        assert result.completion_tokens == 3
        assert engine._cores is None  # given up: the threads stay as configured
    finally:
        engine.close()
