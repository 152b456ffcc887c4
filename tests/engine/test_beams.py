"""Beam search as rows of the running batch, token for token against ``generate``.

A beam request owns ``num_beams`` rows of the slot cache and reorders them in place
after each step, while greedy and sampled rows share the same forward. Every case is
compared with transformers' ``generate`` for that request alone, in float32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.engine.helpers import reference, request, wait_for_tokens

STORY = "Once upon a time"
PROMPTS = ["The dog", "Tom and Sue went to the shop to buy some", "Hello", "A big red ball was"]

CASES: list[dict[str, Any]] = [
    {"max_new_tokens": 12, "num_beams": 3, "early_stopping": True},
    {"max_new_tokens": 14, "num_beams": 4, "early_stopping": False, "num_return_sequences": 3},
    {"max_new_tokens": 10, "num_beams": 2, "early_stopping": "never", "length_penalty": 2.0},
    {"max_new_tokens": 11, "num_beams": 3, "length_penalty": -0.5, "num_return_sequences": 2},
    {"max_new_tokens": 12, "num_beams": 4, "repetition_penalty": 1.4, "no_repeat_ngram_size": 2},
    {"max_length": 34, "num_beams": 5, "early_stopping": True},
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_beam_requests_in_one_batch_equal_generate(
    loaded: Any, make_engine: Any, kwargs: dict[str, Any]
) -> None:
    """Prompts of different lengths, run together, each equal to generate alone."""
    engine = make_engine(loaded)
    futures = [engine.submit(request(p, **kwargs)) for p in PROMPTS]
    for future, prompt in zip(futures, PROMPTS, strict=True):
        result = future.result(timeout=60)
        assert result.outputs == reference(loaded, prompt, **kwargs), prompt
        assert len(result.outputs) == kwargs.get("num_return_sequences", 1)


def test_beams_join_and_leave_a_running_batch(loaded: Any, make_engine: Any) -> None:
    """Beam, greedy and sampled requests come and go mid-batch; each equals generate."""
    engine = make_engine(loaded)
    beam: dict[str, Any] = {"num_beams": 4, "num_return_sequences": 2, "early_stopping": True}
    sample: dict[str, Any] = {"do_sample": True, "top_k": 20, "max_new_tokens": 30}
    long = request(STORY, max_new_tokens=60)
    long_future = engine.submit(long)
    wait_for_tokens(engine, long.id, 4)
    jobs: list[tuple[Any, str, int | None, dict[str, Any]]] = []
    for i, prompt in enumerate(PROMPTS):
        kw = {**beam, "max_new_tokens": 6 + 5 * i}
        jobs.append((engine.submit(request(prompt, **kw)), prompt, None, kw))
    jobs.append((engine.submit(request(STORY, seed=5, **sample)), STORY, 5, sample))
    wait_for_tokens(engine, long.id, 20)
    kw = {"num_beams": 3, "max_new_tokens": 9, "no_repeat_ngram_size": 2}
    jobs.append((engine.submit(request(PROMPTS[1], **kw)), PROMPTS[1], None, kw))
    for future, prompt, seed, kw in jobs:
        assert future.result(timeout=60).outputs == reference(loaded, prompt, seed=seed, **kw)
    assert long_future.result(timeout=60).outputs == reference(loaded, STORY, max_new_tokens=60)


def test_beam_eos_and_finish_reasons(gpt2: Any, make_engine: Any) -> None:
    """A token the beams pick plays eos, so hypotheses finish early and fill the heap."""
    model, tokenizer, _ = gpt2
    engine = make_engine(gpt2)
    kwargs: dict[str, Any] = {"max_new_tokens": 20, "num_beams": 4, "num_return_sequences": 4}
    ids = tokenizer(STORY, return_tensors="pt")
    with torch.inference_mode():
        free = model.generate(**ids, pad_token_id=tokenizer.pad_token_id, **kwargs)
    eos = int(free[1, ids.input_ids.shape[1] + 2])  # the third token of the second beam
    engine.eos_ids = frozenset({eos})
    result = engine.submit(request(STORY, **kwargs)).result(timeout=60)
    assert result.outputs == reference(gpt2, STORY, eos_token_id=eos, **kwargs)
    assert result.outputs != reference(gpt2, STORY, **kwargs)  # eos changed the search


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_sampling_equals_generate(loaded: Any, make_engine: Any, num_beams: int) -> None:
    engine = make_engine(loaded)
    kwargs: dict[str, Any] = {
        "max_new_tokens": 10,
        "num_beams": num_beams,
        "do_sample": True,
        "top_k": 30,
        "top_p": 0.95,
        "temperature": 0.9,
        "num_return_sequences": 2,
    }
    side = engine.submit(request("The dog", max_new_tokens=25))
    result = engine.submit(request(STORY, seed=11, **kwargs)).result(timeout=60)
    assert result.outputs == reference(loaded, STORY, seed=11, **kwargs)
    assert side.result(timeout=60).outputs == reference(loaded, "The dog", max_new_tokens=25)


def test_beam_stop_string(gpt2: Any, make_engine: Any) -> None:
    """Stop strings end a hypothesis (checked on the decoded tail) and cut its text."""
    engine = make_engine(gpt2)
    kwargs: dict[str, Any] = {"max_new_tokens": 16, "num_beams": 3}
    free = engine.submit(request(STORY, **kwargs)).result(timeout=60).outputs[0]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    kwargs["num_return_sequences"] = 3
    result = engine.submit(request(STORY, stop=[stop], **kwargs)).result(timeout=60)
    # Which hypothesis wins depends on the weights; none may show the stop string,
    # and one that met it says so.
    assert result.outputs and all(stop not in text for text in result.outputs)
    assert set(result.finish_reasons) <= {"stop", "length", "eos"}


def test_beam_abort_and_progress(stories: Any, make_engine: Any) -> None:
    engine = make_engine(stories)
    req = request(STORY, max_new_tokens=400, num_beams=3, early_stopping="never")
    future = engine.submit(req)
    wait_for_tokens(engine, req.id, 5)
    engine.abort(req.id)
    result = future.result(timeout=10)
    assert result.aborted and result.completion_tokens >= 5
    assert engine.check_health()


def test_stop_strings_need_no_vocabulary_table(
    gpt2: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long stop strings on a beam request are checked on decoded tails: transformers'
    per-vocabulary StopStringCriteria tables (seconds and hundreds of MiB) are never built."""
    from transformers.generation import stopping_criteria

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("StopStringCriteria built")

    monkeypatch.setattr(stopping_criteria.StopStringCriteria, "__init__", refuse)
    engine = make_engine(gpt2)
    stops = [chr(ord("a") + i) * 256 for i in range(8)]
    kwargs: dict[str, Any] = {"max_new_tokens": 8, "num_beams": 3}
    result = engine.submit(request(STORY, stop=stops, **kwargs)).result(timeout=60)
    assert result.outputs == reference(gpt2, STORY, **kwargs)  # no stop string occurs


def test_a_short_job_is_not_held_up_by_beams_waiting_for_rows(
    stories: Any, make_engine: Any
) -> None:
    """Room for one beam request at a time: a greedy job submitted behind two beam
    requests runs in the rows they cannot use, and finishes while the last one waits."""
    engine = make_engine(stories, max_batch_size=6)
    beam: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 40, "early_stopping": "never"}
    first = request(STORY, **beam)
    beams = [engine.submit(first)]
    wait_for_tokens(engine, first.id, 2)
    last = request("The dog", **beam)
    beams += [engine.submit(request("Hello", **beam)), engine.submit(last)]
    short = engine.submit(request("A big red ball was", max_new_tokens=3))
    assert short.result(timeout=60).outputs == reference(
        stories, "A big red ball was", max_new_tokens=3
    )
    assert engine.progress(last.id) is None  # still waiting for rows
    for future in beams:
        future.result(timeout=120)
