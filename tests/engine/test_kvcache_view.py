"""Random traffic through a SlotCache whose fresh memory is NaN (tests/engine/conftest.py):
every position the model can read stays finite, whatever the order of admissions,
decode steps, retirements, compactions, beam reorders and reallocations."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from tests.engine.test_kvcache import Driver, alone, prompts_of
from worker.engine import fastpath
from worker.engine.kvcache import SlotCache


def assert_view_finite(batch: SlotCache, what: str) -> None:
    w = batch.window
    for i, layer in enumerate(batch.layers):
        for buffer in (layer.key_buffer, layer.value_buffer):
            if buffer is None:
                continue
            view = buffer[: w.rows, :, w.start : w.end]
            bad = (~torch.isfinite(view)).nonzero()
            assert bad.numel() == 0, f"{what}: layer {i}, non-finite at {bad[:4].tolist()}"


class Traffic:
    """Requests of 1-3 rows (rows of one request share a prompt, as beams do)."""

    def __init__(self, model: Any, max_rows: int, rng: random.Random, fast: bool) -> None:
        self.model = model
        self.rng = rng
        self.batch = SlotCache(model.config, max_rows)
        self.step_fn = (
            fastpath.decode_step_for(model, self.batch, max_rows=max_rows) if fast else None
        )
        self.max_rows = max_rows
        self.requests: dict[int, list[int]] = {}
        self.next_id = 0

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> torch.Tensor:
        if self.step_fn is not None and cache is self.batch.cache:
            logits = self.step_fn(ids, mask, positions)
        else:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
        return logits

    def live_rows(self) -> int:
        return sum(len(rows) for rows in self.requests.values())

    def admit(self) -> None:
        room = self.max_rows - self.live_rows()
        group: list[tuple[list[int], int]] = []
        while room > 0 and len(group) < 3:
            n = self.rng.randint(1, min(3, room))
            length = self.rng.choice([1, 2, 3, 5, 8, 20, 45, 90])
            prompt = [self.rng.randrange(4, self.model.config.vocab_size) for _ in range(length)]
            group.append((prompt, n))
            room -= n
            if self.rng.random() < 0.5:
                break
        if not group:
            return
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), cache)
        index = torch.tensor([i for i, (_, n) in enumerate(group) for _ in range(n)])
        layers: list[Any] = list(cache.layers)
        for layer in layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is not None and values is not None:
                layer.keys, layer.values = (
                    keys.index_select(0, index),
                    values.index_select(0, index),
                )
        slots = self.batch.admit(cache, mask.index_select(0, index), logits.argmax(-1)[index])
        at = 0
        for _, n in group:
            self.requests[self.next_id] = slots[at : at + n]
            self.next_id += 1
            at += n

    def step(self) -> None:
        ids, mask, positions = self.batch.step_inputs()
        logits = self._forward(ids, mask, positions, self.batch.cache)
        live = [row for rows in self.requests.values() for row in rows]
        assert torch.isfinite(logits[live]).all(), "a live row's logits are not finite"
        self.batch.advance(logits.argmax(-1))

    def reorder(self) -> None:
        rows: list[int] = []
        sources: list[int] = []
        for own in self.requests.values():
            if len(own) > 1:
                rows.extend(own)
                sources.extend(self.rng.choice(own) for _ in own)
        if rows:
            self.batch.reorder(rows, sources, newest=self.rng.choice([None, 1, 3]))

    def retire(self) -> None:
        if not self.requests:
            return
        done = self.rng.sample(sorted(self.requests), self.rng.randint(1, len(self.requests)))
        self.batch.retire([row for name in done for row in self.requests.pop(name)])

    def compact(self) -> None:
        moved = self.batch.compact()
        self.requests = {k: [moved.get(r, r) for r in rows] for k, rows in self.requests.items()}


@pytest.mark.parametrize("fast", [False, True], ids=["generic", "fast"])
@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_keeps_the_view_finite(gpt2: Any, seed: int, fast: bool) -> None:
    rng = random.Random(seed)
    traffic = Traffic(gpt2[0], max_rows=6, rng=rng, fast=fast)
    with torch.inference_mode():
        for i in range(160):
            op = rng.choices(
                ["admit", "step", "reorder", "retire", "compact"], weights=[2, 8, 1, 2, 1]
            )[0]
            if op != "admit" and not traffic.requests:
                op = "admit"
            getattr(traffic, op)()
            if traffic.batch.mask is not None:
                assert_view_finite(traffic.batch, f"op {i} ({op})")
    assert traffic.batch.copies >= 1  # reallocations happened


def test_a_failed_reallocation_empties_the_cache(
    gpt2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``step_inputs`` reallocates (the right headroom ran out) and runs out of memory
    after layer 0's buffers were replaced. Buffers are replaced one layer at a time (the
    peak stays the old cache plus one layer), so layer 0 would hold a new buffer, unset
    outside what was copied, read through the old window: the cache empties itself
    instead (the engine starts its requests again), and takes newcomers afterwards."""
    from worker.engine import kvcache

    model = gpt2[0]
    with torch.inference_mode():  # as the engine's thread
        p = prompts_of(model.config.vocab_size, 100, 4, 6)
        drv = Driver(model, max_rows=4)
        drv.admit({"a": (p[1], 80), "b": (p[2], 80)})
        drv.admit({"wide": (p[0], 1)})  # done at once: start moves right past 64
        batch = drv.batch
        assert batch.window.start > kvcache.LEFT_ROOM
        while batch.window.end < batch.col_capacity:
            drv.step()
        regrown, calls = kvcache._regrown, {"n": 0}

        def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 3:  # layer 1's keys
                raise torch.OutOfMemoryError("out of memory (injected)")
            return regrown(*args, **kwargs)

        monkeypatch.setattr(kvcache, "_regrown", failing)
        with pytest.raises(torch.OutOfMemoryError):
            batch.step_inputs()
        monkeypatch.setattr(kvcache, "_regrown", regrown)
        assert batch.rows == 0 and batch.mask is None
        assert all(layer.key_buffer is None for layer in batch.layers)
        fresh = Driver(model, max_rows=4)
        fresh.batch = batch  # the emptied cache serves new requests as a new one would
        fresh.admit({"again": (p[1], 10)})
        fresh.run_out()
        assert fresh.tokens["again"] == alone(model, p[1], 10)


def test_the_engine_survives_a_reallocation_that_fails_halfway(
    gpt2: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through the engine: the step fails, the newest half of the batch starts
    again, and the request that stays must still make generate's tokens (here it fails
    with non-finite scores: its layer 0 reads unset memory)."""
    from tests.engine.helpers import reference, request
    from worker.engine import kvcache

    state = {"in_step": False, "n": 0, "failed": False}
    step_inputs, regrown = kvcache.SlotCache.step_inputs, kvcache._regrown

    def stepping(self: SlotCache) -> Any:
        state["in_step"], state["n"] = True, 0
        try:
            return step_inputs(self)
        finally:
            state["in_step"] = False

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        if state["in_step"] and not state["failed"]:
            state["n"] += 1
            if state["n"] == 3:  # layer 1's keys, after layer 0's were replaced
                state["failed"] = True
                raise torch.OutOfMemoryError("out of memory (injected)")
        return regrown(*args, **kwargs)

    monkeypatch.setattr(kvcache.SlotCache, "step_inputs", stepping)
    monkeypatch.setattr(kvcache, "_regrown", failing)
    engine = make_engine(gpt2, express_max_new_tokens=0)
    _, tokenizer, _ = gpt2
    wide = "the dog ran over a hill"
    while len(tokenizer(wide)["input_ids"]) <= kvcache.LEFT_ROOM + 8:  # > LEFT_ROOM tokens
        wide += " the dog ran over a hill"
    prompts = ["The dog ran", "A cat sat on the"]
    with engine._lock:  # the wide one leaves at once: start moves right past 64
        first = engine.submit(request(wide, max_new_tokens=1))
        futures = [engine.submit(request(p, max_new_tokens=120)) for p in prompts]
    first.result(timeout=60)
    results = [f.result(timeout=120) for f in futures]
    assert state["failed"], "the injected failure did not happen"
    for result, prompt in zip(results, prompts, strict=True):
        assert result.outputs == reference(gpt2, prompt, max_new_tokens=120), prompt
