"""The fast decode steps (worker/engine/fastpath) against the model's own forward.

Each family's step must give the logits the model gives on the same slot cache (free
slots, left padding, reallocations included) and, through the engine, greedy fp32
outputs token for token those of ``generate``; models it does not cover keep the
generic path, which stays checked too.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.nn import functional

from tests.engine.helpers import mkldnn_calls, reference, request
from tests.engine.test_kvcache import Driver, alone, prompts_of
from worker.engine import fastpath
from worker.engine.batching import BatchingEngine
from worker.engine.fastpath.linear import can_pack, packed

PROMPTS = ["Once upon a time", "The dog", "Tom and Sue went to the shop to buy some", "Hello"]


class CheckedDriver(Driver):
    """The hand-driven batch of test_kvcache, decoding with the fast step and checking
    every step's logits against the model's forward on the same cache."""

    def __init__(
        self, model: Any, max_rows: int = 8, *, tolerance: float, pack_fp32: bool = False
    ) -> None:
        super().__init__(model, max_rows)
        step = fastpath.decode_step_for(model, self.batch, max_rows=max_rows, pack_fp32=pack_fp32)
        assert step is not None
        self.fast = step
        self.tolerance = tolerance
        self.steps = 0

    def _greedy(self, ids: Any, mask: Any, positions: Any, cache: Any) -> torch.Tensor:
        if cache is not self.batch.cache:  # a prefill: the generic path does it
            return super()._greedy(ids, mask, positions, cache)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        expected = out.logits[:, -1].float()
        got = self.fast(ids, mask, positions)  # writes the same column again
        live = self.batch.live[: self.batch.rows].bool()
        scale = expected[live].abs().max()
        difference = (got[live] - expected[live]).abs().max()
        assert difference <= self.tolerance * scale, (self.steps, difference, scale)
        self.steps += 1
        return got.argmax(-1)


@pytest.fixture
def inference() -> Any:
    with torch.inference_mode():
        yield


@pytest.mark.usefixtures("inference")
@pytest.mark.parametrize("pack_fp32", [False, True], ids=["model-products", "packed"])
def test_fast_step_equals_forward_through_slot_changes(loaded: Any, pack_fp32: bool) -> None:
    """Rows join, finish, leave free slots, are reused and the cache is reallocated:
    the fast step's logits stay the model's (with fp32's products packed too, within a
    few millionths of their scale), and every request's tokens its solo run."""
    model = loaded[0]
    p = prompts_of(model.config.vocab_size, 5, 12, 3, 4, 40, 6)
    drv = CheckedDriver(model, tolerance=1e-5, pack_fp32=pack_fp32)
    plan = {"long": (p[0], 50), "short": (p[1], 4), "mid": (p[2], 30)}
    drv.admit(plan)
    drv.step(5)  # "short" leaves a free slot in the middle
    plan["reuse"] = (p[3], 20)
    drv.admit({"reuse": plan["reuse"]})
    drv.step(3)
    plan["widest"] = (p[4], 12)  # wider than all the room: a reallocation
    drv.admit({"widest": plan["widest"], "two": (p[5], 3)})
    drv.compact()
    drv.run_out()
    assert drv.steps > 40 and drv.batch.copies >= 1
    for name, (prompt, new) in plan.items():
        assert drv.tokens[name] == alone(model, prompt, new), name


@pytest.mark.usefixtures("inference")
def test_fast_step_in_bf16_stays_close_to_forward(loaded: Any) -> None:
    """In bf16 (packed weights where oneDNN has bf16, attention over whole rows of the
    buffers) the step follows the model's own bf16 forward over the window, through
    free slots, reuse, a reallocation and compaction, with the buffers' unset memory
    NaN (conftest): a column read outside the window is masked and finite."""
    model = copy.deepcopy(loaded[0]).to(torch.bfloat16)
    p = prompts_of(model.config.vocab_size, 7, 3, 11, 4, 40, 6)
    drv = CheckedDriver(model, tolerance=0.1)
    drv.admit({"a": (p[0], 30), "b": (p[1], 4), "c": (p[2], 20)})
    drv.step(5)  # "b" leaves a free slot in the middle
    drv.admit({"reuse": (p[3], 12)})
    drv.step(3)
    drv.admit({"widest": (p[4], 8), "two": (p[5], 3)})  # a reallocation
    drv.compact()
    drv.run_out()
    assert drv.steps > 25 and drv.batch.copies >= 1


@pytest.mark.parametrize(
    ("fast", "pack_fp32"),
    [(True, True), (True, False), (False, True)],
    ids=["fast-packed", "fast-model-products", "generic"],
)
def test_engine_greedy_equals_generate(loaded: Any, fast: bool, pack_fp32: bool) -> None:
    """Both decode paths, through the engine, give generate's greedy tokens in fp32, the
    fast one with its products packed (the default) or the model's own."""
    model, tokenizer, info = loaded
    engine = BatchingEngine(model, tokenizer, info, fast_decode=fast, pack_fp32=pack_fp32)
    try:
        assert (engine._main.fast is not None) is fast
        futures = [
            engine.submit(request(p, max_new_tokens=24 + 4 * i)) for i, p in enumerate(PROMPTS)
        ]
        for i, (future, prompt) in enumerate(zip(futures, PROMPTS, strict=True)):
            expected = reference(loaded, prompt, max_new_tokens=24 + 4 * i, do_sample=False)
            assert future.result(timeout=60).outputs == expected
    finally:
        engine.close()


def test_unsupported_options_keep_the_generic_path(gpt2: Any) -> None:
    """A GPT-2 whose attention the step does not reproduce (layer-wise scaling) runs on
    the model's own forward, and still equals generate."""
    from transformers import GPT2LMHeadModel

    model, tokenizer, info = gpt2
    config = copy.deepcopy(model.config)
    config.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(1)
    other = GPT2LMHeadModel(config).eval()
    engine = BatchingEngine(other, tokenizer, info)
    try:
        assert engine._main.fast is None
        result = engine.submit(request(PROMPTS[2], max_new_tokens=16)).result(timeout=60)
        loaded = (other, tokenizer, info)
        assert result.outputs == reference(loaded, PROMPTS[2], max_new_tokens=16, do_sample=False)
    finally:
        engine.close()


def test_packed_linear_equals_f_linear_in_bf16() -> None:
    """The once-packed oneDNN product is the product (where the CPU has bf16 kernels)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(torch.bfloat16)
    bias = torch.randn(96, generator=generator).to(torch.bfloat16)
    product = packed(weight, bias, max_rows=16)
    for rows in (1, 5, 16, 40):  # fewer and more rows than it was packed for
        x = torch.randn(rows, 1, 64, generator=generator).to(torch.bfloat16)
        got, expected = product(x).float(), functional.linear(x, weight, bias).float()
        assert got.shape == (rows, 1, 96)
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)


def test_packed_linear_in_fp32_is_the_product_within_its_last_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp32 is packed only when asked (``fp32=True``); then it is oneDNN's kernel, whose
    sums differ from ``functional.linear``'s in the last bits only."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    bias = torch.randn(96, generator=generator)
    assert not can_pack(weight)
    if not can_pack(weight, fp32=True):
        pytest.skip("torch has no oneDNN here")
    calls = mkldnn_calls(monkeypatch)
    product = packed(weight, bias, max_rows=16, fp32=True)
    for rows in (1, 5, 16, 40):  # fewer and more rows than it was packed for
        x = torch.randn(rows, 1, 64, generator=generator)
        got = product(x)
        assert got.shape == (rows, 1, 96) and got.dtype == torch.float32
        torch.testing.assert_close(got, functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert len(calls) == 4
    gelu = packed(weight, bias, max_rows=16, activation="gelu_new", fp32=True)
    x = torch.randn(7, 1, 64, generator=generator)
    expected = functional.gelu(functional.linear(x, weight, bias), approximate="tanh")
    torch.testing.assert_close(gelu(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("activation", "reference_act"),
    [
        ("gelu_new", lambda x: functional.gelu(x, approximate="tanh")),
        ("silu", functional.silu),
    ],
)
def test_packed_linear_fuses_the_activation(activation: str, reference_act: Any) -> None:
    """The activation fused into the packed bf16 product is the activation."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bf16 kernels on this CPU")
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(128, 64, generator=generator) * 0.2).to(torch.bfloat16)
    bias = torch.randn(128, generator=generator).to(torch.bfloat16)
    x = torch.randn(7, 1, 64, generator=generator).to(torch.bfloat16)
    got = packed(weight, bias, max_rows=16, activation=activation)(x).float()
    expected = reference_act(functional.linear(x.float(), weight.float(), bias.float()))
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)


@pytest.mark.usefixtures("inference")
def test_bf16_compaction_into_a_slot_its_former_occupant_left_non_finite(loaded: Any) -> None:
    """A request whose own values went non-finite (an overflow in its prompt) leaves
    them in its slot when it retires. A live row compacted into that slot must not read
    them: SDPA over the window never did; attention over whole rows reads every column
    of the row, at weight 0, and 0 * NaN is NaN."""
    model = copy.deepcopy(loaded[0]).to(torch.bfloat16)
    p = prompts_of(model.config.vocab_size, 12, 3, 4)
    drv = CheckedDriver(model, tolerance=0.1)
    # "wide" is done at its prefill's token: it leaves row 0 free, and the window's
    # start moves right past its prompt's leftmost columns (nobody live uses them).
    slots = drv.admit({"wide": (p[0], 1), "narrow": (p[1], 20), "late": (p[2], 20)})
    assert slots == {"wide": -1, "narrow": 1, "late": 2}
    w = drv.batch.window
    assert w.start > 0
    for layer in drv.batch.layers:
        assert layer.value_buffer is not None
        layer.value_buffer[0, :, : w.start] = float("nan")  # "wide"'s own overflow
    drv.compact()  # "late" moves into row 0
    assert drv.rows == {"narrow": 1, "late": 0}
    drv.run_out()
    assert drv.steps >= 19


def test_products_attention_in_fp16_stays_finite_where_sdpa_does() -> None:
    """fp16 tops out at 65504: a query-key product that large before the scale (and a
    few thousand after it) overflows a product rounded to fp16 before it is scaled,
    and the softmax of inf is NaN; SDPA (and the model's own forward) stays finite."""
    from worker.engine.fastpath.attention import products_attention

    generator = torch.Generator().manual_seed(0)
    rows, heads, width, dim = 2, 2, 8, 64
    scale = dim**-0.5
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    keys = torch.randn(rows, heads, width, dim, generator=generator)
    values = torch.randn(rows, heads, width, dim, generator=generator)
    query[..., 0] = 40.0
    keys[..., 3, 0] = 2500.0  # 1e5 before the scale, 1.25e4 after it
    keep = torch.ones(rows, 1, 1, width, dtype=torch.bool)
    keep[0, ..., 5:] = False
    expected = functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=keep, scale=scale
    )
    half = [t.to(torch.float16) for t in (query, keys, values)]
    sdpa = functional.scaled_dot_product_attention(*half, attn_mask=keep, scale=scale)
    assert bool(torch.isfinite(sdpa).all())
    got = products_attention(*half, keep, scale)
    torch.testing.assert_close(got.float(), expected, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("pack_fp32", [True, False], ids=["packed", "model-products"])
def test_an_fp32_gpt2_engine_runs_every_product_of_every_forward_on_the_packed_kernel(
    gpt2: Any, pack_fp32: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packed (the default): each forward, the prefill and every decode step, makes its
    four products a layer and the LM head's through oneDNN's packed kernel; with the
    model's own products, none."""
    model, tokenizer, info = gpt2
    if not can_pack(model.lm_head.weight, fp32=True):
        pytest.skip("torch has no oneDNN here, or this is not an x86-64 CPU")
    calls = mkldnn_calls(monkeypatch)
    per_forward = 4 * model.config.n_layer + 1
    engine = BatchingEngine(model, tokenizer, info, threads=1, pack_fp32=pack_fp32)
    try:
        result = engine.submit(request("Once upon a time", max_new_tokens=5))
        assert result.result(timeout=60).completion_tokens == 5
    finally:
        engine.close()
    assert len(calls) == (5 * per_forward if pack_fp32 else 0)  # a prefill, 4 steps


def test_fp32_is_packed_only_on_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Elsewhere (ARM, say) fp32 keeps the model's own products: unmeasured there."""
    import platform

    weight = torch.ones(4, 4)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not can_pack(weight, fp32=True)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert can_pack(weight, fp32=True) is bool(torch.backends.mkldnn.is_available())


def test_the_generic_path_packs_nothing(gpt2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fast_decode=False``: no decode step is built, so no weight is packed (a copy
    of the weights held for nothing)."""
    packs = mkldnn_calls(monkeypatch, "_reorder_linear_weight")
    model, tokenizer, info = gpt2
    BatchingEngine(model, tokenizer, info, fast_decode=False, pack_fp32=True).close()
    assert packs == []
    if can_pack(model.lm_head.weight, fp32=True):  # the spy sees packing where there is any
        BatchingEngine(model, tokenizer, info, pack_fp32=True).close()
        assert packs
