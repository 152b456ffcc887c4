"""Admission order: FIFO, small requests past a blocked one, and no starvation."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future

import pytest

from tests.engine.helpers import request
from worker.engine import admission
from worker.engine.requests import RequestState
from worker.engine.sampling import SamplingSpec


def _state(rows: int) -> RequestState:
    state = RequestState(request=request("x"), future=Future(), spec=SamplingSpec(), n=rows)
    state.prompt_ids, state.max_new, state.tokenized = [1, 2], 2, True
    return state


def test_fifo_then_smaller_ones_past_a_request_that_does_not_fit() -> None:
    big, small, other = _state(5), _state(1), _state(2)
    waiting = deque([small, big, other])
    chosen = admission.pick(waiting, (4, 1000), lambda s: True)
    assert chosen == [small, other] and list(waiting) == [big]
    assert big.passed_over == 1


def test_a_passed_over_request_is_not_starved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "MAX_PASSED_OVER", 2)
    big = _state(5)
    waiting = deque([big])
    admitted = 0
    for _ in range(5):  # each round a new small request arrives behind the big one
        waiting.append(_state(1))
        admitted += len(admission.pick(waiting, (3, 1000), lambda s: True))
    assert admitted == 2 and big.passed_over == 2
    assert admission.pick(waiting, (5, 1000), lambda s: True) == [big]  # rows freed up


def test_a_request_the_tokenizer_refuses_is_dropped() -> None:
    bad, good = _state(1), _state(1)
    bad.tokenized = False
    waiting = deque([bad, good])
    assert admission.pick(waiting, (4, 1000), lambda s: False) == [good]
    assert not waiting
