"""The decode step's bf16/fp16 attention compiled (worker/engine/fastpath/compiled.py):
the same results as the eager products, used by the engine once ready, and never a
failed request where compiling or a compiled call fails."""

from __future__ import annotations

import copy
import logging
import shutil
import time
import types
from typing import Any

import pytest
import torch

from tests.engine.helpers import request
from worker.engine.batching import BatchingEngine
from worker.engine.fastpath import compiled
from worker.engine.fastpath.attention import products_attention
from worker.engine.fastpath.compiled import CompiledAttention, fused_attention

HAS_COMPILER = any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def inputs(
    rows: int,
    heads: int,
    kv_heads: int,
    width: int,
    dtype: torch.dtype,
    seed: int = 0,
    dim: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A query, whole rows of keys and values, and a mask that leaves some columns out
    of every row (their keys large, as a former occupant's may be)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    keys = torch.randn(rows, kv_heads, width, dim, generator=generator)
    values = torch.randn(rows, kv_heads, width, dim, generator=generator)
    keep = torch.rand(rows, 1, 1, width, generator=generator) > 0.3
    keep[..., -1] = True  # every row attends to its newest column
    keys[..., 0, :] = torch.where(keep[:, :, 0, :1], keys[..., 0, :], 300.0)
    return query.to(dtype), keys.to(dtype), values.to(dtype), keep


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("heads", "kv_heads"), [(4, 4), (8, 2)], ids=["one key head each", "grouped-query"]
)
def test_fused_attention_computes_what_the_products_do(
    dtype: torch.dtype, heads: int, kv_heads: int
) -> None:
    query, keys, values, keep = inputs(5, heads, kv_heads, 23, dtype)
    got = fused_attention(query, keys, values, keep, 0.25)
    expected = products_attention(query, keys, values, keep, 0.25)
    assert got.shape == expected.shape == (5, heads, 1, 16) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=0.02, rtol=0.02)


def test_fused_attention_in_fp16_scales_before_it_rounds() -> None:
    """A query-key product too large for fp16 before the scale stays finite, as in
    the products (tests/engine/test_fastpath.py has the products' own case)."""
    query, keys, values, keep = inputs(2, 2, 2, 8, torch.float32)
    query[..., 0] = 40.0
    keys[..., 3, 0] = 2500.0  # 1e5 before the scale, 2.5e4 after it
    keep[..., 3] = True
    half = [t.to(torch.float16) for t in (query, keys, values)]
    got = fused_attention(half[0], half[1], half[2], keep, 0.25)
    assert bool(torch.isfinite(got).all())
    expected = products_attention(half[0], half[1], half[2], keep, 0.25)
    torch.testing.assert_close(got.float(), expected.float(), atol=0.02, rtol=0.02)


def test_a_failing_compiled_call_is_answered_by_the_products_from_then_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attention = CompiledAttention(heads=4, kv_heads=4, dim=16, dtype=torch.bfloat16, scale=0.25)
    calls = []

    def broken(*args: Any) -> torch.Tensor:
        calls.append(args)
        raise RuntimeError("a kernel that cannot run here")

    attention._ready[torch.get_num_threads()] = broken
    query, keys, values, keep = inputs(3, 4, 4, 11, torch.bfloat16)
    expected = products_attention(query, keys, values, keep, 0.25)
    with caplog.at_level(logging.ERROR, logger=compiled.__name__):
        for _ in range(3):
            assert torch.equal(attention(query, keys, values, keep, 0.25), expected)
    assert len(calls) == 1 and attention.failed and not attention.compiled
    assert "compiled attention failed" in caplog.text


@pytest.fixture
def bf16_gpt2(gpt2: Any) -> Any:
    model, tokenizer, info = gpt2
    return copy.deepcopy(model).to(torch.bfloat16), tokenizer, info


def _run(engine: BatchingEngine, count: int) -> list[Any]:
    futures = [
        engine.submit(request(f"prompt number {i} of the compiled test", max_new_tokens=6 + i))
        for i in range(count)
    ]
    return [future.result(timeout=120) for future in futures]


def test_a_failed_compile_leaves_the_engine_serving_uncompiled(
    bf16_gpt2: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(fn: Any, backend: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled, "_compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        engine = BatchingEngine(*bf16_gpt2, compile_attention=True)
        try:
            attention = engine.compiled_attention
            assert attention is not None and attention.ready.wait(30)
            assert attention.failed and not attention.compiled
            results = _run(engine, 3)
        finally:
            engine.close()
    assert [r.completion_tokens for r in results] == [6, 7, 8]
    assert "no C++ compiler found" in caplog.text


def test_fp32_keeps_its_attention_uncompiled(gpt2: Any) -> None:
    """fp32 attends over the window with SDPA, so that greedy tokens stay generate's."""
    engine = BatchingEngine(*gpt2, compile_attention=True)
    try:
        assert engine.compiled_attention is None
        assert engine._main.fast is not None and engine._main.fast.products is None
    finally:
        engine.close()


needs_compiler = pytest.mark.skipif(
    not HAS_COMPILER, reason="torch.compile needs a C++ compiler on a CPU"
)


@needs_compiler
@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads"),
    [(torch.bfloat16, 8, 2), (torch.float16, 4, 4)],
    ids=["bf16 grouped-query", "fp16"],
)
def test_the_compiled_code_rounds_as_the_products_do(
    dtype: torch.dtype, heads: int, kv_heads: int
) -> None:
    """Large scores, masked columns and the step's layouts (a strided query, the first
    rows of larger buffers): the compiled code's result is the products' to within a
    rounding (inductor keeps theirs; without that it differs by up to 0.125 here), at
    any row count, compiled once."""
    attention = CompiledAttention(heads=heads, kv_heads=kv_heads, dim=16, dtype=dtype, scale=0.25)
    attention.start(None)
    assert attention.ready.wait(600) and attention.compiled, attention.compilers
    with torch.inference_mode():
        for rows in (2, 7, 16):
            query, keys, values, keep = inputs(rows, heads, kv_heads, 41, torch.float32, seed=rows)
            query, keys, values = (3 * t for t in (query, keys, values))
            fused_qkv = torch.cat([query, query], dim=1).to(dtype)  # a strided view's layout
            query = fused_qkv[:, :heads]
            buffers = [torch.zeros(rows + 3, *t.shape[1:], dtype=dtype) for t in (keys, values)]
            buffers[0][:rows], buffers[1][:rows] = keys, values
            args = (query, buffers[0][:rows], buffers[1][:rows], keep, 0.25)
            got = attention(*args)
            expected = products_attention(*args)
            torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=8e-3)
    assert not attention.failed and attention.compilers == [compiled.COMPILER_THREAD]


@needs_compiler
@pytest.mark.parametrize("share", [False, True], ids=["fixed threads", "fewer threads later"])
def test_the_engine_attends_through_code_compiled_on_other_threads(
    bf16_gpt2: Any, share: bool
) -> None:
    """Compiled on a thread of its own while the engine serves, then used by both lanes'
    decode steps; a new thread count (GENQ_SHARE_CORES) gets its own compilation on
    another thread while the products answer. Never one on the scheduler thread."""
    engine = BatchingEngine(*bf16_gpt2, compile_attention=True, max_batch_size=8, threads=2)
    try:
        attention = engine.compiled_attention
        assert attention is not None
        early = _run(engine, 2)  # served while it compiles (or after)
        assert attention.ready.wait(600) and 2 in attention._ready, attention.compilers
        assert engine._main.fast is not None and engine._express.fast is not None
        assert engine._main.fast.products is attention
        assert engine._express.fast.products is attention
        if share:  # what IdleCores answers while another process holds a core
            engine._cores = types.SimpleNamespace(threads=lambda: 1)  # type: ignore[assignment]
            _run(engine, 3)
            deadline = time.monotonic() + 600
            while 1 not in attention._ready and time.monotonic() < deadline:
                time.sleep(0.1)
        counts = [1] if share else [2]
        used: list[int] = []
        for threads in counts:
            real = attention._ready[threads]

            def counted(*args: Any, real: Any = real) -> torch.Tensor:
                used.append(torch.get_num_threads())
                return real(*args)

            attention._ready[threads] = counted
        late = _run(engine, 5)
        assert used and set(used) == set(counts)
        assert [r.completion_tokens for r in early + late] == [6, 7, 6, 7, 8, 9, 10]
        assert not attention.failed
        assert set(attention.compilers) == {compiled.COMPILER_THREAD}
        assert len(attention.compilers) == (2 if share else 1)
    finally:
        engine.close()


@needs_compiler
def test_two_thread_counts_compiled_at_once_both_serve_compiled() -> None:
    """Two thread counts asked back to back (GENQ_SHARE_CORES lowering the count while
    the first compiles): each count's code is compiled for that count, on a compiling
    thread, and neither is compiled again where it is called."""
    attention = CompiledAttention(heads=4, kv_heads=2, dim=16, dtype=torch.bfloat16, scale=0.25)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():  # the scheduler's tensors are inference tensors
            args = (*inputs(9, 4, 2, 50, torch.bfloat16), 0.25)
            for threads in (1, 3):
                torch.set_num_threads(threads)
                attention(*args)
            deadline = time.monotonic() + 600
            while not {1, 3} <= set(attention._ready) and not attention.failed:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            for threads in (1, 3):
                torch.set_num_threads(threads)
                assert attention.compiled
                got = attention(*args)
                expected = products_attention(*args)
                torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=8e-3)
    finally:
        torch.set_num_threads(before)
    assert not attention.failed, attention.compilers
    assert attention.compilers == [compiled.COMPILER_THREAD] * 2


def test_a_compile_that_never_reached_the_backend_is_not_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where torch hands the function back uncompiled (as it does with
    TORCH_COMPILE_DISABLE set), its slow eager version never answers: the products do."""
    monkeypatch.setattr(compiled, "_compile", lambda fn, backend: fn)
    attention = CompiledAttention(heads=4, kv_heads=4, dim=16, dtype=torch.bfloat16, scale=0.25)
    attention.start(None)
    assert attention.ready.wait(120)
    assert attention.failed and not attention.compiled and not attention._ready
