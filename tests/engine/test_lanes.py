"""A short request beside a busy batch runs in its own small steps (the express lane),
and a beam request's prompt is prefilled once for all its beams."""

from __future__ import annotations

import dataclasses
from collections import deque
from concurrent.futures import Future
from typing import Any

import pytest

from tests.engine.helpers import reference, request, wait_for_tokens
from worker.engine import admission, batching, lanes, layerhooks
from worker.engine.requests import RequestState
from worker.engine.sampling import SamplingSpec

STORY = "Once upon a time"
BEAMS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 40}
PROMPTS = ["The dog", "Tom and Sue went to the shop to buy some", "A big red ball was"]


def _count_steps(engine: Any) -> dict[str, int]:
    """Decode steps so far, per lane."""
    counts = {"main": 0, "express": 0}
    decode = engine._decode

    def counted(lane: Any) -> None:
        counts["main" if lane is engine._main else "express"] += 1
        decode(lane)

    engine._decode = counted
    return counts


@pytest.mark.parametrize("express", [16, 0], ids=["express", "no-express"])
def test_a_short_request_beside_busy_beams_takes_no_turns_of_theirs(
    loaded: Any, make_engine: Any, express: int
) -> None:
    """Behind 15 beam rows, an 8-token greedy request is done within three of their
    steps (two express turns; without the express lane it rides eight of them), and
    everyone's output equals generate's."""
    engine = make_engine(loaded, express_max_new_tokens=express)
    counts = _count_steps(engine)
    beams = [request(p, **BEAMS) for p in PROMPTS]
    beam_futures = [engine.submit(r) for r in beams]
    wait_for_tokens(engine, beams[0].id, 5)

    before = counts["main"]
    at_finish: list[int] = []
    short = engine.submit(request(STORY, max_new_tokens=8))
    short.add_done_callback(lambda _: at_finish.append(counts["main"]))
    assert short.result(timeout=60).outputs == reference(loaded, STORY, max_new_tokens=8)

    main_steps_meanwhile = at_finish[0] - before
    if express:
        assert main_steps_meanwhile <= 3 and counts["express"] >= 7
    else:
        assert main_steps_meanwhile >= 7 and counts["express"] == 0
    for future, prompt in zip(beam_futures, PROMPTS, strict=True):
        assert future.result(timeout=120).outputs == reference(loaded, prompt, **BEAMS), prompt


def test_a_short_bulk_request_shares_the_main_batch(loaded: Any, make_engine: Any) -> None:
    """A batch's line (priority low), however short, rides the busy batch's steps: bulk
    work keeps the main batch's throughput."""
    engine = make_engine(loaded)
    counts = _count_steps(engine)
    beams = [request(p, **BEAMS) for p in PROMPTS]
    beam_futures = [engine.submit(r) for r in beams]
    wait_for_tokens(engine, beams[0].id, 5)
    line = dataclasses.replace(request(STORY, max_new_tokens=8), priority="low")
    assert engine.submit(line).result(timeout=60).outputs == reference(
        loaded, STORY, max_new_tokens=8
    )
    assert counts["express"] == 0
    for future in beam_futures:
        future.result(timeout=120)


def test_short_requests_past_the_express_rows_share_the_main_batch(
    stories: Any, make_engine: Any
) -> None:
    """Six short requests at once: four rows run in the express lane, the other two in
    the main batch; each equals generate."""
    engine = make_engine(stories)
    counts = _count_steps(engine)
    prompts = [*PROMPTS, "One day", "The sun", "A cat"]
    with engine._lock:  # the scheduler sees them together
        futures = [engine.submit(request(p, max_new_tokens=6)) for p in prompts]
    for future, prompt in zip(futures, prompts, strict=True):
        assert future.result(timeout=60).outputs == reference(stories, prompt, max_new_tokens=6)
    assert counts["express"] >= 5 and counts["main"] >= 5


def test_a_beam_request_prefills_its_prompt_once(loaded: Any, make_engine: Any) -> None:
    """The prefill forward holds one row per request, not one per beam."""
    engine = make_engine(loaded)
    forward = engine._forward
    prefill_rows: list[int] = []

    def recorded(ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        if all(cache is not lane.batch.cache for lane in (engine._main, engine._express)):
            prefill_rows.append(ids.shape[0])
        return forward(ids, mask, positions, cache)

    engine._forward = recorded
    kwargs: dict[str, Any] = {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 10}
    futures = [engine.submit(request(p, **kwargs)) for p in PROMPTS[:2]]
    for future, prompt in zip(futures, PROMPTS[:2], strict=True):
        assert future.result(timeout=60).outputs == reference(loaded, prompt, **kwargs)
    assert sum(prefill_rows) == 2


def _waiting(prompt_tokens: int) -> RequestState:
    state = RequestState(request=request("x"), future=Future(), spec=SamplingSpec())
    state.prompt_ids, state.max_new, state.tokenized = [1] * prompt_tokens, 4, True
    return state


def test_a_burst_of_prompts_is_prefilled_a_slice_per_iteration() -> None:
    """Prompt tokens admitted at one iteration stay within PREFILL_TOKENS (one request
    at least, however long its prompt)."""
    waiting = deque([_waiting(admission.PREFILL_TOKENS - 10), _waiting(20), _waiting(30)])
    first = admission.pick(waiting, (64, 10**6), lambda s: True)
    assert [len(s.prompt_ids) for s in first] == [admission.PREFILL_TOKENS - 10]
    assert [len(s.prompt_ids) for s in admission.pick(waiting, (64, 10**6), lambda s: True)] == [
        20,
        30,
    ]
    long = _waiting(admission.PREFILL_TOKENS * 3)
    assert admission.pick(deque([long, _waiting(5)]), (64, 10**6), lambda s: True) == [long]


def _prompt_of(tokenizer: Any, tokens: int) -> str:
    """A prompt of at least ``tokens`` tokens."""
    words = ["the dog ran"]
    while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.append("the dog ran")
    return " ".join(words)


def _two_prefill_groups_and_a_short_job(
    loaded: Any, engine: Any, *, short_in_prefill: bool = False
) -> list[tuple[Any, str, dict]]:
    """Submit, in one go, a beam request and a greedy one (20 new tokens: the main lane's)
    whose prompts are prefilled in two forwards (the beams first: a busy main lane after
    the first; forwards of at most 128 tokens, patched by the ``small_prefills``
    fixture), and a short job that fits the express lane: with them, or with
    ``short_in_prefill`` during the first main prefill (its turn comes between two
    layers of it, both groups still to be placed). Return (future, prompt, params) of
    each; the short job's future is filled in when it is sent."""
    _, tokenizer, _ = loaded
    jobs = [
        # The beams' prompt the longer: an admission prefills the longest first.
        (_prompt_of(tokenizer, 80), {"num_beams": 5, "max_new_tokens": 6}),
        (_prompt_of(tokenizer, 70), {"max_new_tokens": 20}),
    ]
    short: tuple[str, dict[str, Any]] = (STORY, {"max_new_tokens": 16})  # four turns
    with engine._lock:  # the scheduler sees them all at its next admission
        submitted = [(engine.submit(request(p, **kw)), p, kw) for p, kw in jobs]
        if not short_in_prefill:
            return [*submitted, (engine.submit(request(short[0], **short[1])), *short)]
    sent: list[Any] = []

    def arrive(*_: Any) -> None:  # the first layer of a main prefill, once
        if engine._turns_in_model and not sent:
            sent.append(engine.submit(request(short[0], **short[1])))

    hook = layerhooks.decoder_layers(loaded[0])[0].register_forward_pre_hook(arrive)
    try:
        for future, _, _ in submitted:
            future.exception(timeout=60)
    finally:
        hook.remove()
    assert sent, "the short job was not sent during a main prefill"
    return [*submitted, (sent[0], *short)]


def _check(loaded: Any, submitted: list[tuple[Any, str, dict]]) -> None:
    for future, prompt, kw in submitted:
        assert future.result(timeout=30).outputs == reference(loaded, prompt, **kw)


@pytest.fixture
def small_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill forwards of at most 128 padded tokens: the tiny models' prompts then
    take several."""
    monkeypatch.setattr(batching, "PREFILL_GROUP_TOKENS", 128)


@pytest.mark.usefixtures("small_prefills")
def test_express_admission_counts_the_requests_still_to_prefill(
    loaded: Any, make_engine: Any
) -> None:
    """Between two prefill forwards, the express lane does not take cache tokens already
    promised to the requests admitted but not yet prefilled: the running requests never
    hold more than max_tokens_in_flight."""
    _, tokenizer, _ = loaded
    costs = [
        n * (len(tokenizer(p)["input_ids"]) + new)
        for p, n, new in (
            (_prompt_of(tokenizer, 70), 5, 6),
            (_prompt_of(tokenizer, 80), 1, 20),
            (STORY, 1, 16),
        )
    ]
    limit = sum(costs) - 1  # all three together do not fit
    engine = make_engine(loaded, max_tokens_in_flight=limit)
    held: list[int] = []
    decode = engine._decode

    def recorded(lane: Any) -> None:
        held.append(engine._main.tokens + engine._express.tokens)
        decode(lane)

    engine._decode = recorded
    _check(loaded, _two_prefill_groups_and_a_short_job(loaded, engine, short_in_prefill=True))
    assert max(held) <= limit


@pytest.mark.usefixtures("small_prefills")
def test_an_error_in_the_express_turn_between_prefills_strands_no_request(
    loaded: Any, make_engine: Any
) -> None:
    """A scheduler bug in the express turn that runs between two prefill forwards
    restarts the batch; the requests admitted but not yet prefilled start again too
    (none waits forever) and everyone's output equals generate's."""
    engine = make_engine(loaded)
    express_turn = engine._express_turn
    raised = [False]

    def flaky() -> None:
        if engine._main.jobs and not raised[0]:  # the turn after the first prefill
            raised[0] = True
            raise RuntimeError("a scheduler bug")
        express_turn()

    engine._express_turn = flaky
    _check(loaded, _two_prefill_groups_and_a_short_job(loaded, engine))
    assert raised[0] and engine.check_health()


def _first_norm_of_layer(engine: Any, index: int) -> Any:
    """The module a fast decode step calls first in layer ``index`` (GPT-2 or Llama)."""
    body = engine._main.fast.body
    layers = body.h if hasattr(body, "h") else body.layers
    layer = layers[index]
    return layer.ln_1 if hasattr(layer, "ln_1") else layer.input_layernorm


def test_a_short_request_arriving_mid_step_runs_before_that_step_ends(
    loaded: Any, make_engine: Any
) -> None:
    """A short request that arrives while the main batch's decode step is in its first
    layers is done before that step ends (its express turn, prefill and the steps of a
    turn, comes between two layers, not after the whole step), and everyone's output
    still equals generate's."""
    engine = make_engine(loaded)
    steps = {"running": False, "done": 0}
    decode = engine._decode

    def counted(lane: Any) -> None:
        steps["running"] = lane is engine._main
        decode(lane)
        if lane is engine._main:
            steps["done"] += 1
        steps["running"] = False

    engine._decode = counted
    beams = [request(p, **BEAMS) for p in PROMPTS]
    beam_futures = [engine.submit(r) for r in beams]
    wait_for_tokens(engine, beams[0].id, 5)

    short_request = request(STORY, max_new_tokens=4)  # one express turn
    sent: dict[str, Any] = {}
    finished_after: list[int] = []

    def arrive(*_: Any) -> None:  # in the main step's first layer, once
        if steps["running"] and "future" not in sent:
            sent["during"] = steps["done"]
            sent["future"] = engine.submit(short_request)
            sent["future"].add_done_callback(lambda _: finished_after.append(steps["done"]))

    hook = _first_norm_of_layer(engine, 0).register_forward_pre_hook(arrive)
    try:
        wait_for_tokens(engine, beams[0].id, 10)
    finally:
        hook.remove()
    assert sent["future"].result(timeout=60).outputs == reference(loaded, STORY, max_new_tokens=4)
    # Finished while the step it arrived in ran (main steps done: still as many).
    assert finished_after == [sent["during"]]
    for future, prompt in zip(beam_futures, PROMPTS, strict=True):
        assert future.result(timeout=120).outputs == reference(loaded, prompt, **BEAMS), prompt


def test_a_long_request_arriving_mid_step_gives_the_express_lane_no_turn_there(
    loaded: Any, make_engine: Any
) -> None:
    """A request too long for the express lane (normal priority, one row, 40 new
    tokens) that arrives while the main batch's decode step runs, the express lane
    busy, gives the express lane no turn inside that step (nor inside any later one:
    no short request arrived): the main batch waits for the express lane once per
    forward, not once more for every arrival. Everyone's output equals generate's."""
    engine = make_engine(loaded, express_max_new_tokens=32)
    seen = {"main": False, "nested": 0}
    decode = engine._decode

    def counted(lane: Any) -> None:
        if lane is not engine._main:
            seen["nested"] += seen["main"]  # an express step inside a main step
            decode(lane)
            return
        seen["main"] = True
        try:
            decode(lane)
        finally:
            seen["main"] = False

    engine._decode = counted
    long_prompt = "A big red ball was"
    long_request = request(long_prompt, max_new_tokens=40)  # the main lane's
    sent: dict[str, Any] = {}

    def arrive(*_: Any) -> None:  # in a main step's first layer, the express lane busy
        if seen["main"] and engine._express.jobs and "future" not in sent:
            seen["nested"] = 0  # what the express lane did before does not count
            sent["future"] = engine.submit(long_request)

    hook = _first_norm_of_layer(engine, 0).register_forward_pre_hook(arrive)
    try:
        with engine._lock:  # the short one takes the express lane, the beams the main
            beam_futures = [engine.submit(request(p, **BEAMS)) for p in PROMPTS[:2]]
            short = engine.submit(request(STORY, max_new_tokens=32))  # eight turns
        assert short.result(timeout=60).outputs == reference(loaded, STORY, max_new_tokens=32)
    finally:
        hook.remove()
    assert sent["future"].result(timeout=120).outputs == reference(
        loaded, long_prompt, max_new_tokens=40
    )
    assert seen["nested"] == 0
    for future, prompt in zip(beam_futures, PROMPTS, strict=False):
        assert future.result(timeout=120).outputs == reference(loaded, prompt, **BEAMS), prompt


def test_short_requests_arriving_at_every_layer_get_one_turn_inside_a_step(
    loaded: Any, make_engine: Any
) -> None:
    """Short requests arriving at every layer of the main batch's steps: the main batch
    waits for at most one express turn inside each step (EXPRESS_STEPS_PER_TURN express
    steps), not one per layer, and every output equals generate's."""
    engine = make_engine(loaded)
    inside: dict[str, int] = {"running": 0, "express": 0}
    per_step: list[int] = []
    decode = engine._decode

    def counted(lane: Any) -> None:
        if lane is engine._main:
            inside["running"], inside["express"] = 1, 0
            decode(lane)
            inside["running"] = 0
            per_step.append(inside["express"])
        else:
            inside["express"] += inside["running"]
            decode(lane)

    engine._decode = counted
    beams = [request(p, **BEAMS) for p in PROMPTS]
    beam_futures = [engine.submit(r) for r in beams]
    wait_for_tokens(engine, beams[0].id, 5)

    shorts: list[tuple[Any, str]] = []

    def arrive(*_: Any) -> None:
        if inside["running"] and len(shorts) < 12:
            prompt = PROMPTS[len(shorts) % len(PROMPTS)]
            shorts.append((engine.submit(request(prompt, max_new_tokens=12)), prompt))

    body = engine._main.fast.body
    layers = body.h if hasattr(body, "h") else body.layers
    hooks = [
        _first_norm_of_layer(engine, i).register_forward_pre_hook(arrive)
        for i in range(len(layers))
    ]
    try:
        wait_for_tokens(engine, beams[0].id, 12)
    finally:
        for hook in hooks:
            hook.remove()
    for future, prompt in shorts:
        assert future.result(timeout=60).outputs == reference(loaded, prompt, max_new_tokens=12)
    assert shorts and max(per_step) <= lanes.EXPRESS_STEPS_PER_TURN, per_step
    for future, prompt in zip(beam_futures, PROMPTS, strict=True):
        assert future.result(timeout=120).outputs == reference(loaded, prompt, **BEAMS), prompt


@pytest.mark.parametrize("forward", ["prefill", "generic-decode"])
def test_a_short_request_arriving_in_a_forward_through_the_model_runs_before_it_ends(
    loaded: Any, make_engine: Any, forward: str
) -> None:
    """A short request that arrives while the main lane's forward runs through the
    model's own layers (a prefill; a decode step of a model without a fast step) is done
    before that forward ends: its express turn comes between two layers. Everyone's
    output still equals generate's."""
    engine = make_engine(loaded, fast_decode=forward == "prefill")
    method = "_prefill" if forward == "prefill" else "_decode"
    phase = {"main": False, "done": 0}
    inner = getattr(engine, method)

    def counted(lane: Any, *args: Any) -> None:
        outer, phase["main"] = phase["main"], lane is engine._main
        try:
            inner(lane, *args)
        finally:
            phase["main"] = outer
            phase["done"] += lane is engine._main

    setattr(engine, method, counted)
    short_request = request(STORY, max_new_tokens=4)  # one express turn
    sent: dict[str, Any] = {}
    finished_after: list[int] = []

    def arrive(*_: Any) -> None:  # in the first layer of a main forward, once
        if phase["main"] and "future" not in sent:
            sent["during"] = phase["done"]
            sent["future"] = engine.submit(short_request)
            sent["future"].add_done_callback(lambda _: finished_after.append(phase["done"]))

    hook = layerhooks.decoder_layers(loaded[0])[0].register_forward_pre_hook(arrive)
    try:
        beam_futures = [engine.submit(request(p, **BEAMS)) for p in PROMPTS]
        beams = [future.result(timeout=120).outputs for future in beam_futures]
        short = sent["future"].result(timeout=60).outputs
    finally:
        hook.remove()
    # Finished while the forward it arrived in ran (main forwards done: still as many).
    assert finished_after == [sent["during"]]
    assert short == reference(loaded, STORY, max_new_tokens=4)
    for outputs, prompt in zip(beams, PROMPTS, strict=True):
        assert outputs == reference(loaded, prompt, **BEAMS), prompt


def test_decoder_layers_are_found_for_each_model_family(loaded: Any) -> None:
    """The express turn's hooks sit on the model's decoder layers (GPT-2 and Llama)."""
    model = loaded[0]
    layers = layerhooks.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers >= 2
    assert all(type(layer).__name__.endswith(("Block", "DecoderLayer")) for layer in layers)


def test_a_forward_on_another_thread_gets_no_express_turn(loaded: Any, make_engine: Any) -> None:
    """The layer hooks sit on the model itself: a forward another thread runs on it
    (generate beside the engine, as these tests do) while the main lane's forward runs
    gives no express turn on that thread, which would race the scheduler's."""
    engine = make_engine(loaded)
    turns: list[str] = []
    engine._between_layers = lambda: turns.append("turn")
    engine._turns_in_model = True  # as while the main lane's prefill runs
    try:
        reference(loaded, STORY, max_new_tokens=2)
    finally:
        engine._turns_in_model = False
    assert turns == []


def test_a_failure_in_a_nested_turn_strands_no_request_it_took(
    loaded: Any, make_engine: Any
) -> None:
    """A scheduler bug in an express turn inside a main prefill, after the turn took a
    short job off the queue and before the job joined the express lane: the job starts
    again (it is not left in no lane and no queue), and everyone's output equals
    generate's."""
    engine = make_engine(loaded)
    split = engine._prefill_split
    raised = [False]

    def flaky(lane: Any, group: Any) -> None:
        if lane is engine._express and engine._turns_in_model and not raised[0]:
            raised[0] = True
            raise RuntimeError("a scheduler bug in the nested turn")
        split(lane, group)

    engine._prefill_split = flaky
    sent: list[Any] = []

    def arrive(*_: Any) -> None:  # the first layer of a main prefill, once
        if engine._turns_in_model and not sent:
            sent.append(engine.submit(request(STORY, max_new_tokens=4)))

    hook = layerhooks.decoder_layers(loaded[0])[0].register_forward_pre_hook(arrive)
    try:
        beams = [engine.submit(request(p, **BEAMS)) for p in PROMPTS]
        outputs = [future.result(timeout=120).outputs for future in beams]
    finally:
        hook.remove()
    assert raised[0]
    assert sent[0].result(timeout=30).outputs == reference(loaded, STORY, max_new_tokens=4)
    for got, prompt in zip(outputs, PROMPTS, strict=True):
        assert got == reference(loaded, prompt, **BEAMS), prompt
