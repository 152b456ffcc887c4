"""Prefills through the fast step's packed products (worker/engine/fastpath/routing.py).

The engine's forwards through the model (prefills) call the products the fast decode
step packed once, on the scheduler thread only: in bf16, and in fp32 unless the engine
keeps the model's own products (``pack_fp32=False``, then nothing of them is routed);
the logits stay the model's own within the rounding, and any other thread gets the
model untouched.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from tests.engine.helpers import mkldnn_calls, reference, request
from worker.engine import fastpath, kvcache
from worker.engine.batching import BatchingEngine
from worker.engine.fastpath.linear import can_pack, linear
from worker.engine.fastpath.routing import route

Pairs = list[tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]]


def _bf16_pairs(loaded: Any) -> tuple[Any, Pairs]:
    model = copy.deepcopy(loaded[0]).to(torch.bfloat16)
    if not can_pack(model.get_output_embeddings().weight):
        pytest.skip("this CPU has no packed bf16 kernels")
    step = fastpath.decode_step_for(model, kvcache.SlotCache(model.config, 4), max_rows=4)
    assert step is not None
    return model, step.packed_modules()


def _fp32_pairs(model: Any) -> Pairs:
    if not can_pack(model.get_output_embeddings().weight, fp32=True):
        pytest.skip("torch has no oneDNN here")
    step = fastpath.decode_step_for(
        model, kvcache.SlotCache(model.config, 4), max_rows=4, pack_fp32=True
    )
    assert step is not None
    pairs = step.packed_modules()
    assert any(isinstance(module, (torch.nn.Linear, Conv1D)) for module, _ in pairs)
    return pairs


def _counted(pairs: Pairs) -> tuple[Pairs, list[int]]:
    calls = [0] * len(pairs)

    def counting(i: int, packed: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        def call(x: torch.Tensor) -> torch.Tensor:
            calls[i] += 1
            return packed(x)

        return call

    return [(module, counting(i, packed)) for i, (module, packed) in enumerate(pairs)], calls


def _prefill_logits(model: Any) -> torch.Tensor:
    """Last-position logits of a left-padded batch of two prompts, as the engine's
    prefill computes them."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    logits: torch.Tensor = out.logits[:, -1].float()
    return logits


def test_a_routed_prefill_runs_every_packed_product_and_keeps_the_logits(loaded: Any) -> None:
    model, pairs = _bf16_pairs(loaded)
    own = _prefill_logits(model)
    counted, calls = _counted(pairs)
    undo = route(counted, lambda: True)
    try:
        routed = _prefill_logits(model)
    finally:
        undo()
    assert calls == [1] * len(pairs)  # every routed module is on the forward's path
    scale = own.abs().max()
    assert (routed - own).abs().max() <= 0.05 * scale  # bf16 rounding, summed in another order


def test_only_the_routed_thread_gets_the_packed_products(loaded: Any) -> None:
    model, pairs = _bf16_pairs(loaded)
    counted, calls = _counted(pairs)
    here = threading.current_thread()
    undo = route(counted, lambda: threading.current_thread() is here)
    other = threading.Thread(target=_prefill_logits, args=(model,))
    other.start()
    other.join()
    assert calls == [0] * len(pairs)
    _prefill_logits(model)
    assert calls == [1] * len(pairs)
    undo()
    _prefill_logits(model)
    assert calls == [1] * len(pairs)
    assert all("forward" not in module.__dict__ for module, _ in pairs)


def test_two_engines_routing_one_model_each_keep_their_own_until_the_last_undo(
    loaded: Any,
) -> None:
    model, pairs = _bf16_pairs(loaded)
    first, first_calls = _counted(pairs)
    second, second_calls = _counted(pairs)
    turn = {"first": True}
    undo_first = route(first, lambda: turn["first"])
    undo_second = route(second, lambda: not turn["first"])
    _prefill_logits(model)
    turn["first"] = False
    _prefill_logits(model)
    assert first_calls == second_calls == [1] * len(pairs)
    undo_first()  # the second engine's route stays
    _prefill_logits(model)
    assert first_calls == [1] * len(pairs) and second_calls == [2] * len(pairs)
    undo_second()
    _prefill_logits(model)
    assert second_calls == [2] * len(pairs)
    assert all("forward" not in module.__dict__ for module, _ in pairs)


def _packed_calls(engine: BatchingEngine, monkeypatch: pytest.MonkeyPatch) -> int:
    """Calls of the packed kernel in a one-token request (its prefill alone)."""
    kernel, calls = torch.ops.mkldnn._linear_pointwise, []

    def spy(*args: Any) -> Any:
        calls.append(1)
        return kernel(*args)

    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
        engine.submit(request("Once upon", max_new_tokens=1)).result(timeout=60)
    return len(calls)


@pytest.mark.parametrize("closed_first", ["older", "newer"])
def test_closing_one_engine_keeps_the_others_routing(
    loaded: Any, monkeypatch: pytest.MonkeyPatch, closed_first: str
) -> None:
    model, pairs = _bf16_pairs(loaded)
    tokenizer, info = loaded[1], loaded[2]
    older = BatchingEngine(model, tokenizer, info, max_batch_size=4, threads=1)
    newer = BatchingEngine(model, tokenizer, info, max_batch_size=4, threads=1)
    gone, kept = (older, newer) if closed_first == "older" else (newer, older)
    try:
        gone.close()
        assert _packed_calls(kept, monkeypatch) > 0
    finally:
        older.close()
        newer.close()
    assert all("forward" not in module.__dict__ for module, _ in pairs)


def test_a_copy_of_a_routed_model_computes_with_its_own_weights(loaded: Any) -> None:
    model, pairs = _bf16_pairs(loaded)
    engine = BatchingEngine(model, loaded[1], loaded[2], max_batch_size=4, threads=1)
    try:
        clone = copy.deepcopy(model)
    finally:
        engine.close()
    name = next(n for n, m in model.named_modules() if m is pairs[0][0])  # lm_head
    layer = clone.get_submodule(name)
    with torch.no_grad():
        layer.weight.zero_()
        x = torch.randn(1, 2, layer.weight.shape[1], dtype=torch.bfloat16)
        assert layer(x).abs().max() == 0


def test_a_module_without_a_packed_product_is_not_routed(gpt2: Any) -> None:
    """fp32 GPT-2: ``linear`` gives the Conv1D itself; routing it would call itself."""
    conv = gpt2[0].transformer.h[0].attn.c_attn
    undo = route([(conv, linear(conv, 4))], lambda: True)
    try:
        assert "forward" not in conv.__dict__
        conv(torch.ones(1, 1, conv.weight.shape[0]))
    finally:
        undo()


def test_fp32_with_the_models_own_products_routes_none(loaded: Any) -> None:
    """With ``pack_fp32=False`` fp32's products stay the model's own: at most its
    activation is routed (computed in place, bit for bit: tests/engine/test_activation.py),
    and closing the engine leaves no module routed."""
    model = loaded[0]
    step = fastpath.decode_step_for(model, kvcache.SlotCache(model.config, 4), max_rows=4)
    assert step is not None
    products = (torch.nn.Linear, Conv1D)
    assert not any(isinstance(module, products) for module, _ in step.packed_modules())
    engine = BatchingEngine(
        model, loaded[1], loaded[2], max_batch_size=4, threads=1, pack_fp32=False
    )
    try:
        engine.submit(request("Once upon", max_new_tokens=2)).result(timeout=60)
        routed = [m for m in model.modules() if "forward" in m.__dict__]
        assert not any(isinstance(module, products) for module in routed)
    finally:
        engine.close()
    assert not any("forward" in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_an_engines_prefill_runs_on_packed_weights(
    loaded: Any, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One new token each: the prefill makes it, no decode step runs; the packed kernel
    still ran, on the scheduler thread, and closing the engine un-routes the model. fp32
    packs by default, and its tokens are still ``generate``'s."""
    if dtype == "bf16":
        model, pairs = _bf16_pairs(loaded)
    else:
        model, pairs = loaded[0], _fp32_pairs(loaded[0])
    tokenizer, info = loaded[1], loaded[2]
    threads = mkldnn_calls(monkeypatch)
    engine = BatchingEngine(model, tokenizer, info, max_batch_size=4, threads=1)
    prompts = ("Once upon", "The dog")
    try:
        results = [engine.submit(request(p, max_new_tokens=1)).result(timeout=60) for p in prompts]
        assert all(r.completion_tokens == 1 for r in results)
    finally:
        engine.close()
    assert threads and set(threads) == {"genq-engine"}
    assert all("forward" not in module.__dict__ for module, _ in pairs)
    if dtype == "fp32":
        for prompt, result in zip(prompts, results, strict=True):
            expected = reference(loaded, prompt, max_new_tokens=1, do_sample=False)
            assert result.outputs == expected
