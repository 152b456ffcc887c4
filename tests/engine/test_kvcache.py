"""Slot reuse in the running KV cache: every request's tokens are those it makes alone.

The first tests drive :class:`~worker.engine.kvcache.SlotCache` by hand, as the engine
does, so each scenario (a freed slot reused, a prompt wider than the window, a
reallocation, a compaction) happens at a known step; the others go through the engine.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from tests.engine.helpers import reference, request, wait_for_tokens
from worker.engine.kvcache import SlotCache

Prompt = list[int]


def alone(model: Any, prompt: Prompt, new: int) -> list[int]:
    """Greedy tokens for ``prompt`` run by itself: no padding, no other rows."""
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(new):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].float().argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens


class Driver:
    """Greedy continuous batching over a SlotCache, one request per row, by hand.

    Run it in inference mode (the ``inference`` fixture), as the engine's thread is.
    """

    def __init__(self, model: Any, max_rows: int = 8) -> None:
        self.model = model
        self.batch = SlotCache(model.config, max_rows)
        self.rows: dict[str, int] = {}
        self.wanted: dict[str, int] = {}
        self.tokens: dict[str, list[int]] = {}

    def _greedy(self, ids: Any, mask: Any, positions: Any, cache: Any) -> torch.Tensor:
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        chosen: torch.Tensor = out.logits[:, -1].float().argmax(-1)
        return chosen

    def admit(self, prompts: dict[str, tuple[Prompt, int]]) -> dict[str, int]:
        """Prefill ``name: (prompt, max_new)`` as a left-padded mini-batch; their slots."""
        width = max(len(p) for p, _ in prompts.values())
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in prompts.values()])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in prompts.values()])
        cache = DynamicCache(config=self.model.config)
        chosen = self._greedy(ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), cache)
        slots = self.batch.admit(cache, mask, chosen)
        for (name, (_, new)), slot, token in zip(
            prompts.items(), slots, chosen.tolist(), strict=True
        ):
            self.rows[name], self.wanted[name], self.tokens[name] = slot, new, [token]
        self.retire_finished()
        return {name: self.rows.get(name, -1) for name in prompts}

    def step(self, count: int = 1) -> None:
        """``count`` decode steps, retiring requests as they reach their length."""
        for _ in range(count):
            chosen = self._greedy(*self.batch.step_inputs(), self.batch.cache)
            self.batch.advance(chosen)
            for name, row in self.rows.items():
                self.tokens[name].append(int(chosen[row]))
            self.retire_finished()

    def retire_finished(self) -> None:
        done = [n for n, row in self.rows.items() if len(self.tokens[n]) >= self.wanted[n]]
        self.batch.retire([self.rows.pop(n) for n in done])

    def compact(self) -> None:
        moved = self.batch.compact()
        self.rows = {name: moved.get(row, row) for name, row in self.rows.items()}

    def run_out(self) -> None:
        while self.rows:
            self.step()


def prompts_of(vocab: int, *lengths: int) -> list[Prompt]:
    generator = torch.Generator().manual_seed(sum(lengths))
    # Skip the lowest ids: special tokens (eos, pad) in the tiny tokenizers.
    return [torch.randint(4, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture
def inference() -> Any:
    """The engine's thread runs in inference mode; so does the hand-driven batch."""
    with torch.inference_mode():
        yield


@pytest.mark.usefixtures("inference")
def test_slots_reused_widened_reallocated_compacted(loaded: Any) -> None:
    """Each request's tokens equal its solo run, whatever happened to the slots around it."""
    model = loaded[0]
    p = prompts_of(model.config.vocab_size, 5, 12, 3, 4, 14, 40, 6, 9)
    drv = Driver(model)
    plan: dict[str, tuple[Prompt, int]] = {
        "long": (p[0], 60),
        "short": (p[1], 4),
        "mid": (p[2], 30),
    }
    assert drv.admit(plan) == {"long": 0, "short": 1, "mid": 2}
    drv.step(3)  # "short" is done: slot 1 is free in the middle, nothing was copied
    assert "short" not in drv.rows and drv.batch.rows == 3 and drv.batch.free_rows == 1
    copies = drv.batch.copies

    plan["reuse"] = (p[3], 20)
    assert drv.admit({"reuse": plan["reuse"]}) == {"reuse": 1}
    assert drv.batch.copies == copies  # only the newcomer's keys were copied
    drv.step(2)

    # Wider than the window (whose leading columns went with "short"), but there is
    # room on the left: the window just widens.
    assert drv.batch.window.width < len(p[4]) <= drv.batch.window.end
    plan["wider"] = (p[4], 25)
    assert drv.admit({"wider": plan["wider"]}) == {"wider": 3}
    assert drv.batch.copies == copies
    drv.step(4)

    # Wider than all the room there is: one reallocation.
    assert len(p[5]) > drv.batch.window.end
    plan["widest"] = (p[5], 12)
    drv.admit({"widest": plan["widest"], "two": (p[6], 3)})
    assert drv.batch.copies == copies + 1
    drv.step(16)  # "reuse", "two" and "widest" finish: rows 4 and 5 drop, 1 stays free

    assert drv.batch.rows == 4 and drv.batch.free_rows == 1
    drv.compact()  # "wider" moves from row 3 into slot 1: only that row is copied
    assert drv.rows["wider"] == 1 and drv.batch.rows == 3 and drv.batch.free_rows == 0
    assert drv.batch.copies == copies + 1
    plan["late"] = (p[7], 10)
    assert drv.admit({"late": plan["late"]}) == {"late": 3}  # into the row "wider" left
    drv.run_out()
    assert drv.batch.rows == 0

    for name, (prompt, new) in plan.items():
        assert drv.tokens[name] == alone(model, prompt, new), name


@pytest.mark.usefixtures("inference")
def test_reallocation_writes_only_the_window(gpt2: Any) -> None:
    """Growing the cache copies the rows and columns in view and leaves the rest of the
    new buffers as they came (zeroing them cost ~1 s at 160 rows: a stall of every
    running request); a newcomer's row is zeroed where it comes into view."""
    model = gpt2[0]
    p = prompts_of(model.config.vocab_size, 6, 4, 30, 3)
    plan = {"a": (p[0], 40), "b": (p[1], 40), "wide": (p[2], 40), "narrow": (p[3], 20)}
    drv = Driver(model, max_rows=8)
    drv.admit({"a": plan["a"]})
    drv.step(2)
    copies = drv.batch.copies
    drv.admit({"b": plan["b"], "wide": plan["wide"]})  # a wider window
    assert drv.batch.copies == copies + 1
    w = drv.batch.window
    keys = drv.batch.layers[0].key_buffer
    assert keys is not None and w.rows == 3 and keys.shape[0] == 8  # max_rows at once
    assert torch.isfinite(keys[: w.rows, :, w.start : w.end]).all()
    assert torch.isnan(keys[w.rows :]).all()  # the spare rows: not written
    assert torch.isnan(keys[:, :, w.end :]).all()  # the right headroom: not written
    drv.step(2)
    # Into a spare row, narrower than the window: the columns left of its prompt
    # come into view unwritten and must be zeroed.
    assert drv.admit({"narrow": plan["narrow"]}) == {"narrow": 3}
    assert torch.isfinite(keys[: w.rows, :, w.start : w.end]).all()
    drv.run_out()
    for name, (prompt, new) in plan.items():
        assert drv.tokens[name] == alone(model, prompt, new), name


@pytest.mark.usefixtures("inference")
def test_compacted_row_in_a_tainted_slot_then_the_window_widens(loaded: Any) -> None:
    """A request whose own values went non-finite (an overflow in its prompt) leaves
    them in its slot. A row compacted into that slot, then a wider newcomer moving the
    window's start left over those columns: the moved row must still see zeros there
    (masked, weight 0, and 0 * NaN is NaN), in fp32 over the window too."""
    model = loaded[0]
    p = prompts_of(model.config.vocab_size, 12, 3, 4, 10)
    drv = Driver(model)
    slots = drv.admit({"wide": (p[0], 1), "narrow": (p[1], 20), "late": (p[2], 20)})
    assert slots == {"wide": -1, "narrow": 1, "late": 2}
    w = drv.batch.window
    left = w.start
    assert left > 0
    for layer in drv.batch.layers:
        assert layer.value_buffer is not None
        layer.value_buffer[0, :, :left] = float("nan")  # "wide"'s own overflow
    drv.compact()  # "late" moves into row 0
    assert drv.rows == {"narrow": 1, "late": 0}
    drv.step(2)
    drv.admit({"wider": (p[3], 6)})  # moves start left over "wide"'s columns
    assert w.start < left and drv.batch.copies == 0
    drv.run_out()
    for name, prompt, new in (("narrow", p[1], 20), ("late", p[2], 20), ("wider", p[3], 6)):
        assert drv.tokens[name] == alone(model, prompt, new), name


@pytest.mark.usefixtures("inference")
def test_many_rounds_of_retire_and_admit(gpt2: Any) -> None:
    """Requests of mixed lengths come and go through a few slots for many steps."""
    model = gpt2[0]
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 24, (14,), generator=generator).tolist()
    news = torch.randint(1, 20, (14,), generator=generator).tolist()
    prompts = prompts_of(model.config.vocab_size, *lengths)
    drv = Driver(model, max_rows=4)
    pending = [(f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts, news, strict=True))]
    while pending or drv.rows:
        room = 4 - len(drv.rows)
        if room and pending:
            batch, pending = pending[:room], pending[room:]
            drv.admit({name: (p, n) for name, p, n in batch})
        if not pending and drv.batch.free_rows:
            drv.compact()  # the tail: nothing waits, the last rows move up
        if drv.rows:
            drv.step()
    assert drv.batch.copies <= 3  # growth by chunks, not per retire
    for i, (prompt, new) in enumerate(zip(prompts, news, strict=True)):
        assert drv.tokens[f"r{i}"] == alone(model, prompt, new), f"r{i}"


def test_engine_mixed_lengths_equal_solo(loaded: Any, make_engine: Any) -> None:
    """Many requests with mixed prompt and output lengths through few rows: each as alone."""
    engine = make_engine(loaded, max_batch_size=4)
    words = ["the", "dog", "ran", "over", "a", "hill", "and", "sat", "under", "an", "old", "tree"]
    jobs = [(" ".join(words[: 1 + (i * 5) % len(words)]), 2 + (i * 7) % 30) for i in range(12)]
    futures = [engine.submit(request(p, max_new_tokens=n)) for p, n in jobs]
    for future, (prompt, new) in zip(futures, jobs, strict=True):
        assert future.result(timeout=60).outputs == reference(loaded, prompt, max_new_tokens=new)


def test_a_burst_of_mixed_lengths_is_admitted_without_copying_the_cache(
    gpt2: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Newcomers of one admission prefill in several mini-batches (lengths 2 to 48):
    none copies the rows already in the cache to widen it, and each request still
    makes the tokens it makes alone."""
    from concurrent.futures import Future

    from worker.engine.batching import PREFILL_FORWARD_COST, PREFILL_GROUP_TOKENS
    from worker.engine.requests import RequestState, prefill_groups
    from worker.engine.sampling import SamplingSpec

    engine = make_engine(gpt2, express_max_new_tokens=0)  # every request in the main lane
    copies: list[int] = []
    regrow = SlotCache._reallocate
    monkeypatch.setattr(
        SlotCache, "_reallocate", lambda self, *a, **k: (copies.append(1), regrow(self, *a, **k))
    )
    words = "the dog ran over a hill and sat under an old tree".split()  # noqa: SIM905
    prompts = [" ".join(words[j % len(words)] for j in range(n)) for n in range(2, 49, 4)]
    states = [
        RequestState(request=request(p), future=Future(), spec=SamplingSpec(), prompt_ids=ids, n=1)
        for p in prompts
        if (ids := gpt2[1](p).input_ids)
    ]
    groups = prefill_groups(states, PREFILL_FORWARD_COST, PREFILL_GROUP_TOKENS)
    assert len(groups) > 1  # the case at hand: several prefill forwards
    with engine._lock:  # one admission
        futures = [engine.submit(request(p, max_new_tokens=3)) for p in prompts]
    for future, prompt in zip(futures, prompts, strict=True):
        assert future.result(timeout=60).outputs == reference(gpt2, prompt, max_new_tokens=3)
    assert copies == []


def test_engine_freed_slot_wider_prompt(loaded: Any, make_engine: Any) -> None:
    """A request admitted into a slot freed mid-batch, with a prompt wider than the
    window, makes the tokens it makes alone (compaction off, so the slot is reused)."""
    engine = make_engine(loaded)
    engine.compact_free_slots = False
    long = request("The dog", max_new_tokens=400)
    with engine._lock:  # one admission: "short" takes slot 0, "long" slot 1
        short = engine.submit(request("Hello", max_new_tokens=2))
        long_future = engine.submit(long)
    short.result(timeout=30)
    wait_for_tokens(engine, long.id, 2)
    wide = "Tom and Sue went to the shop to buy some bread and milk for their mother. " * 2
    result = engine.submit(request(wide, max_new_tokens=12)).result(timeout=30)
    engine.abort(long.id)
    long_future.result(timeout=30)
    assert result.outputs == reference(loaded, wide, max_new_tokens=12)


def test_engine_num_return_sequences_in_crowd(stories: Any, make_engine: Any) -> None:
    """Seeded n=3 sampling in scattered free slots draws exactly as alone."""
    engine = make_engine(stories)
    engine.compact_free_slots = False
    kwargs: dict[str, Any] = {"max_new_tokens": 16, "do_sample": True, "num_return_sequences": 3}
    story = "Once upon a time"
    expected = reference(stories, story, seed=7, **kwargs)
    # One admission of six: the short ones leave slots 0, 2 and 4 free between long ones.
    crowd = [request(p, max_new_tokens=1 if i % 2 == 0 else 400) for i, p in enumerate("abcdef")]
    with engine._lock:
        futures = [engine.submit(r) for r in crowd]
    for future in futures[::2]:
        future.result(timeout=30)
    result = engine.submit(request(story, seed=7, **kwargs)).result(timeout=30)
    for r in crowd[1::2]:
        engine.abort(r.id)
    for future in futures:
        future.result(timeout=30)
    assert result.outputs == expected


def test_prefill_groups_cut_padding() -> None:
    """Mixed prompt lengths prefill in a few groups of similar length; equal ones in one."""
    from concurrent.futures import Future

    from worker.engine.requests import RequestState, prefill_groups
    from worker.engine.sampling import SamplingSpec

    def state(length: int, n: int = 1) -> RequestState:
        return RequestState(
            request=request("x"), future=Future(), spec=SamplingSpec(), prompt_ids=[1] * length, n=n
        )

    same = [state(32) for _ in range(8)]
    assert prefill_groups(same, 64) == [same]
    mixed = [state(8 + (i * 37) % 193, n=1 + i % 3) for i in range(40)]
    groups = prefill_groups(mixed, 64)
    assert sorted(map(id, mixed)) == sorted(id(s) for g in groups for s in g)

    def padded(group: list[RequestState]) -> int:  # a request's prompt is one row
        return len(group) * max(len(s.prompt_ids) for s in group)

    assert 1 < len(groups) < 12
    assert sum(padded(g) for g in groups) + 64 * len(groups) < padded(mixed) * 0.7
    capped = prefill_groups(mixed, 64, max_tokens=256)
    assert sorted(map(id, mixed)) == sorted(id(s) for g in capped for s in g)
    assert all(padded(g) <= 256 or len(g) == 1 for g in capped)
    assert max(padded(g) for g in groups) > 256  # the cap is what split them


def test_reorder_copies_parents_keys_and_values_in_place(gpt2: Any) -> None:
    """Beam rows take their parents' keys and values (a swap included); others stay."""
    batch = SlotCache(gpt2[0].config, 4)
    batch.window.rows, batch.window.start, batch.window.end = 4, 1, 3
    for layer in batch.layers:
        layer.key_buffer = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 5, 3).clone()
        layer.value_buffer = layer.key_buffer + 10
    batch.reorder([0, 1, 2], [1, 0, 0])  # rows 0 and 1 swap, row 2 continues row 0
    for layer in batch.layers:
        assert layer.key_buffer is not None and layer.value_buffer is not None
        in_view = layer.key_buffer[:, 0, 1:3, 0]
        assert in_view[:, 0].tolist() == [1.0, 0.0, 0.0, 3.0]
        assert layer.value_buffer[:, 0, 1, 0].tolist() == [11.0, 10.0, 10.0, 13.0]
        assert layer.key_buffer[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # out of view
