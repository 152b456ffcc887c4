"""GPT-2's activation computed in place (worker/engine/fastpath/activation.py).

The fast fp32 step and the engine's prefills compute ``gelu_new`` in one buffer instead
of eight; greedy fp32 outputs must stay token for token those of ``generate``, so the
result must be the model's own activation bit for bit, for every input.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from transformers.activations import GELUActivation, NewGELUActivation

from tests.engine.helpers import reference, request
from worker.engine.fastpath import activation as activation_module
from worker.engine.fastpath.activation import activation, gelu_new_in_place

SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-7, 3.0, -3.0, 9.0, -9.0, 1e10, -1e10, 3e38, -3e38]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gelu_new_in_place_is_the_models_own_bit_for_bit(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(128 * 3072, generator=generator) * 4,
            torch.tensor([*SPECIAL, float("inf"), float("-inf"), float("nan")]),
        ]
    )
    x = values.to(dtype)
    expected = NewGELUActivation()(x)
    got = gelu_new_in_place(x)
    assert torch.equal(got.isnan(), expected.isnan())
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # signed zeros too
    number = ~got.isnan()
    assert torch.equal(got.view(bits)[number], expected.view(bits)[number])


def test_gelu_new_in_place_leaves_its_input_and_keeps_its_layout() -> None:
    x = torch.randn(6, 4, 8).transpose(0, 2)  # not contiguous
    before = x.clone()
    got = gelu_new_in_place(x)
    assert torch.equal(x, before)
    assert torch.equal(got, NewGELUActivation()(x))
    assert got.shape == x.shape


def test_only_a_known_formula_is_rewritten() -> None:
    assert activation(NewGELUActivation()) is gelu_new_in_place
    exact_gelu = GELUActivation()  # one kernel already: left as the model has it
    assert activation(exact_gelu) is exact_gelu
    silu = torch.nn.SiLU()
    assert activation(silu) is silu


def test_an_fp32_gpt2_engine_computes_it_in_place_and_still_equals_generate(
    gpt2: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the model's own fp32 products (``pack_fp32=False``), the prefill (the model's
    own forward, routed on the scheduler thread) and the decode steps use the in-place
    activation; another thread running the model gets its own module; the tokens are
    generate's."""
    threads: list[str] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return gelu_new_in_place(x)

    monkeypatch.setitem(activation_module._IN_PLACE, "NewGELUActivation", spy)
    engine = make_engine(gpt2, pack_fp32=False)
    layers = gpt2[0].config.n_layer
    prompt = "Once upon a time there was"
    assert engine.submit(request(prompt, max_new_tokens=1)).result(timeout=60).outputs == (
        reference(gpt2, prompt, max_new_tokens=1, do_sample=False)
    )
    assert threads == ["genq-engine"] * layers  # one prefill, no decode step
    assert reference(gpt2, prompt, max_new_tokens=6, do_sample=False) == (
        engine.submit(request(prompt, max_new_tokens=6)).result(timeout=60).outputs
    )
    assert threads == ["genq-engine"] * layers * 7  # generate's calls were not routed
