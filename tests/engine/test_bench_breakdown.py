"""The benchmark's decode-step breakdown measures the main batch's steps."""

from __future__ import annotations

from typing import Any

import pytest

from bench import _hardware
from bench._workload import Prompt
from worker.engine.batching import BatchingEngine


def test_the_breakdown_counts_every_decode_step_it_times(
    gpt2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of short prompts (as the mixed workload has) runs every step in the
    main batch: the breakdown divides the decode steps' time by the main batch's
    forwards, so a step of the express lane would be timed but not counted."""
    model, tokenizer, _ = gpt2
    lanes: list[str] = []
    decode = BatchingEngine._decode

    def counted(engine: Any, lane: Any) -> None:
        lanes.append("main" if lane is engine._main else "express")
        decode(engine, lane)

    monkeypatch.setattr(BatchingEngine, "_decode", counted)
    prompts = [
        Prompt(text=f"prompt {i} " + "word " * (5 + 6 * (i % 7)), ids=(), max_new_tokens=8)
        for i in range(32)
    ]
    parts = _hardware.step_breakdown(model, tokenizer, prompts, 32)
    assert lanes and set(lanes) == {"main"}
    assert parts["steps"] == len(lanes)
