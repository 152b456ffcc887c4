"""One request can fail only itself; errors that belong to no request fail none.

Each case runs a faulty request among healthy greedy, sampled and beam requests and
checks that the healthy ones produce exactly what ``generate`` makes for them alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from core.schemas import GenerationParams
from tests.engine.helpers import reference, request
from worker.engine import requests as engine_requests
from worker.engine.base import REQUEUE, GenerationError, GenerationRequest

STORY = "Once upon a time"
HEALTHY: list[tuple[str, int | None, dict[str, Any]]] = [
    ("The dog", None, {"max_new_tokens": 20}),
    ("Hello there", 3, {"max_new_tokens": 18, "do_sample": True, "top_k": 20}),
    ("A big red ball was", None, {"max_new_tokens": 12, "num_beams": 3}),
]


def _healthy(engine: Any) -> list[Any]:
    return [engine.submit(request(p, seed=seed or 0, **kw)) for p, seed, kw in HEALTHY]


def _check_healthy(loaded: Any, futures: list[Any]) -> None:
    for future, (prompt, seed, kw) in zip(futures, HEALTHY, strict=True):
        assert future.result(timeout=60).outputs == reference(loaded, prompt, seed=seed, **kw)


def _fails_with(future: Any, code: str) -> GenerationError:
    with pytest.raises(GenerationError) as info:
        future.result(timeout=60)
    assert info.value.code == code, info.value.message
    return info.value


def _poison_rows_of(engine: Any, request_id: str) -> None:
    """From its third decode step on, the model's logits of one request's rows are NaN."""
    forward: Callable[..., torch.Tensor] = engine._forward
    steps = [0]

    def poisoned(*args: Any) -> torch.Tensor:
        logits = forward(*args)
        for lane in (engine._express, engine._main):
            if args[3] is not lane.batch.cache:  # not this lane's decode step
                continue
            for state, rows in lane.slots.items():
                if state.request.id == request_id:
                    steps[0] += 1
                    if steps[0] > 2:
                        logits[rows] = float("nan")
        return logits

    engine._forward = poisoned


@pytest.mark.parametrize("kind", ["greedy", "sampled", "beams"])
def test_a_poisoned_row_fails_its_request_alone(loaded: Any, make_engine: Any, kind: str) -> None:
    engine = make_engine(loaded)
    params = {
        "greedy": {},
        "sampled": {"do_sample": True},
        "beams": {"num_beams": 2},
    }[kind]
    bad = request(STORY, max_new_tokens=30, **params)
    _poison_rows_of(engine, bad.id)
    futures = _healthy(engine)
    bad_future = engine.submit(bad)
    _check_healthy(loaded, futures)
    _fails_with(bad_future, "non_finite_scores")
    assert engine.check_health()


def test_a_temperature_that_slipped_past_the_edge_fails_only_its_request(
    loaded: Any, make_engine: Any
) -> None:
    """The issue's hostile input (smaller here: these logits are tiny): the API refuses it,
    and the engine survives it anyway."""
    engine = make_engine(loaded)
    hostile = {"do_sample": True, "top_k": 1, "temperature": 1e-45, "max_new_tokens": 40}
    params = GenerationParams.model_construct(**{**GenerationParams().model_dump(), **hostile})
    futures = _healthy(engine)
    bad = engine.submit(GenerationRequest(id="hostile", prompt=STORY, params=params, seed=1))
    _fails_with(bad, "non_finite_scores")
    _check_healthy(loaded, futures)


@pytest.mark.parametrize("beams", [1, 3])
def test_an_exception_in_one_requests_stop_check_fails_it_alone(
    loaded: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch, beams: int
) -> None:
    check = engine_requests.tail_has_stop

    def flaky(prompt_ids: list[int], tokens: list[int], stops: list[str], tok: Any) -> bool:
        if "boom" in stops and len(tokens) >= 3:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "a tokenizer bug")
        return check(prompt_ids, tokens, stops, tok)

    monkeypatch.setattr(engine_requests, "tail_has_stop", flaky)
    engine = make_engine(loaded)
    futures = _healthy(engine)
    bad = engine.submit(request(STORY, max_new_tokens=30, num_beams=beams, stop=["boom"]))
    error = _fails_with(bad, "generation_failed")
    assert "tokenizer bug" in error.message
    _check_healthy(loaded, futures)


def test_a_decode_forward_error_restarts_the_newest_half_and_nobody_fails(
    loaded: Any, make_engine: Any
) -> None:
    """An error no request owns (out of memory in the shared forward) fails nothing."""
    engine = make_engine(loaded, express_max_new_tokens=0)  # all three share the steps
    forward = engine._forward
    calls = [0]

    def flaky(ids: torch.Tensor, *args: Any) -> torch.Tensor:
        calls[0] += 1
        if ids.shape[1] == 1 and calls[0] in (8, 9):  # two decode steps in a row
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return forward(ids, *args)

    engine._forward = flaky
    futures = _healthy(engine)
    _check_healthy(loaded, futures)
    assert calls[0] > 9 and engine.check_health()


def test_out_of_memory_alone_hands_the_job_back(stories: Any, make_engine: Any) -> None:
    engine = make_engine(stories)
    forward = engine._forward

    def oom(ids: torch.Tensor, *args: Any) -> torch.Tensor:
        if ids.shape[1] == 1:
            raise torch.OutOfMemoryError("out of memory")
        return forward(ids, *args)

    engine._forward = oom
    _fails_with(engine.submit(request(STORY, max_new_tokens=5)), REQUEUE)
    engine._forward = forward
    assert engine.submit(request(STORY, max_new_tokens=5)).result(timeout=30).outputs == (
        reference(stories, STORY, max_new_tokens=5)
    )


def test_a_scheduler_bug_outside_the_model_step_does_not_kill_the_engine(
    loaded: Any, make_engine: Any
) -> None:
    """An exception while retiring restarts the batch; the thread lives, nobody fails."""
    engine = make_engine(loaded)
    retire = engine._main.batch.retire
    calls = [0]

    def flaky(slots: list[int]) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a scheduler bug")
        retire(slots)

    engine._main.batch.retire = flaky
    futures = _healthy(engine)
    _check_healthy(loaded, futures)
    assert calls[0] >= 1 and engine.check_health()


def test_a_tokenizer_error_fails_only_that_request(
    stories: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(stories)
    tokenizer = engine.tokenizer

    class Picky:
        def __call__(self, text: str, **kw: Any) -> Any:
            if "poison" in text:
                raise ValueError("cannot tokenize this")
            return tokenizer(text, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

    engine.tokenizer = Picky()
    ok = engine.submit(request(STORY, max_new_tokens=6))
    _fails_with(engine.submit(request("poison", max_new_tokens=6)), "tokenize_failed")
    assert ok.result(timeout=30).outputs == reference(stories, STORY, max_new_tokens=6)


def test_a_request_larger_than_the_worker_is_refused_not_run_alone(
    stories: Any, make_engine: Any
) -> None:
    engine = make_engine(stories, max_batch_size=4, max_tokens_in_flight=100)
    _fails_with(engine.submit(request(STORY, max_new_tokens=200)), "request_too_large")
    _fails_with(engine.submit(request(STORY, num_beams=5, max_new_tokens=5)), "request_too_large")
    assert engine.submit(request(STORY, max_new_tokens=5)).result(timeout=30).completion_tokens == 5


def test_a_request_that_cannot_start_fails_alone_and_never_hangs(
    loaded: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception while a request joins the batch is that request's error."""
    engine = make_engine(loaded)
    start = engine_requests.RequestState.start

    def flaky(self: Any, *args: Any) -> None:
        start(self, *args)
        if self.request.id == "unlucky":
            raise KeyError("a bug in one request's set-up")

    monkeypatch.setattr(engine_requests.RequestState, "start", flaky)
    futures = _healthy(engine)
    params = GenerationParams(max_new_tokens=10)
    bad = engine.submit(GenerationRequest(id="unlucky", prompt=STORY, params=params, seed=1))
    _fails_with(bad, "generation_failed")
    _check_healthy(loaded, futures)
    assert engine.check_health()
