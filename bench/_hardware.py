"""How near the hardware each system runs: the matrix-product ceiling and a breakdown
of one engine decode step, measured in this process on the bench's model.

The ceiling is the tokens/s that the model's own matrix products allow at a batch of
``rows`` one-token rows: every linear layer (the LM head included) timed alone with
``F.linear`` on random inputs, best of a few repeats, summed. A system's share of it is
its tokens/s over that figure. With weights packed once for oneDNN (``worker/engine/fastpath``,
bf16 and by default fp32) the products themselves get faster than ``F.linear``'s, so that
ceiling is printed too.

The breakdown runs :class:`~worker.engine.batching.BatchingEngine` on ``rows`` prompts
with its sections timed: the forward (split into matrix products, attention, other
tensor ops and the Python between them by a profile of one mid-run step), sampling
(choosing tokens) and bookkeeping (step inputs, cache advance, recording tokens and
stop checks, retiring finished requests).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench._cpu import cpu_flags
from bench._workload import Prompt

# New tokens per prompt in the breakdown run (fewer when a prompt asks for fewer).
BREAKDOWN_STEPS = 32
_MATMUL_OPS = ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise")
# Batched products are attention's: the bf16 fast step's (worker.engine.fastpath.attention),
# the weights' products being (add)mm or packed.
_ATTENTION_MARKS = ("scaled_dot_product", "flash_attention", "aten::bmm")


@dataclasses.dataclass(frozen=True)
class Ceiling:
    """Milliseconds per decode step that the matrix products alone take at ``rows``."""

    rows: int
    linear_ms: float
    packed_ms: float | None  # with weights packed once for oneDNN (the engine's), else None

    @property
    def tokens_per_s(self) -> float:
        return self.rows / self.linear_ms * 1000

    @property
    def packed_tokens_per_s(self) -> float | None:
        return None if self.packed_ms is None else self.rows / self.packed_ms * 1000


def _linear_weights(model: Any) -> list[tuple[Any, Any]]:
    """Every linear layer's ``[out, in]`` weight and bias (GPT-2's Conv1D transposed)."""
    import torch

    out = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out.append((module.weight.detach(), module.bias))
        elif type(module).__name__ == "Conv1D":
            out.append((module.weight.detach().t().contiguous(), module.bias))
    return out


def _best_ms(calls: Sequence[Callable[[], Any]], repeats: int) -> float:
    for call in calls:  # warm-up: first-call allocations and kernel selection
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def matmul_ceiling(model: Any, rows: int, repeats: int = 5) -> Ceiling:
    """Time the model's linear layers alone at ``rows`` rows (see the module doc)."""
    import torch
    from torch.nn import functional

    from worker.engine.fastpath.linear import can_pack, packed

    weights = _linear_weights(model)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        w.shape[1]: torch.randn(rows, w.shape[1], generator=generator).to(w.dtype)
        for w, _ in weights
    }
    with torch.inference_mode():
        plain = [(lambda w=w, b=b: functional.linear(inputs[w.shape[1]], w, b)) for w, b in weights]
        linear_ms = _best_ms(plain, repeats)
        packed_ms = None
        if can_pack(weights[0][0], fp32=True):
            products = [
                functools.partial(packed(w, b, rows, fp32=True), inputs[w.shape[1]])
                for w, b in weights
            ]
            packed_ms = _best_ms(products, repeats)
    return Ceiling(rows=rows, linear_ms=linear_ms, packed_ms=packed_ms)


class _Sections:
    """Wall time per named section of the scheduler thread, counted in decode steps."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.in_decode = False
        self.steps = 0
        self.rows = 0
        self.profiled_ms = 0.0  # the profiled step's forward, left out of the means

    def wrap(self, name: str, fn: Callable[..., Any], *, decode_only: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.in_decode or not decode_only:
                    took = (time.perf_counter() - start) * 1000
                    self.ms[name] = self.ms.get(name, 0.0) + took

        return timed


def _profile_shares(forward: Callable[[], Any]) -> dict[str, float]:
    """Run ``forward`` once under the profiler: each category's share of its wall time."""
    import torch

    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward()
    wall = (time.perf_counter() - start) * 1e6
    spent = {"matmul": 0.0, "attention": 0.0, "other_ops": 0.0}
    for event in prof.key_averages():
        name, self_us = event.key, event.self_cpu_time_total
        if name in _MATMUL_OPS:
            spent["matmul"] += self_us
        elif any(mark in name for mark in _ATTENTION_MARKS):
            spent["attention"] += self_us
        elif name.startswith(("aten::", "mkldnn::")):
            spent["other_ops"] += self_us
    spent["python"] = max(0.0, wall - sum(spent.values()))
    total = sum(spent.values()) or 1.0
    return {k: v / total for k, v in spent.items()}


def step_breakdown(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    rows: int,
    *,
    fast: bool = True,
    threads: int | None = None,
    pack_fp32: bool = True,
) -> dict[str, Any]:
    """One engine run of ``rows`` prompts; milliseconds per decode step by section. With
    ``threads``, the engine's thread runs the model with that many torch threads (call it
    from a thread that runs none: :mod:`bench._threads`)."""
    from core.schemas import GenerationParams
    from worker.engine import batching
    from worker.engine.base import GenerationRequest, ModelInfo
    from worker.engine.batching import BatchingEngine
    from worker.engine.loader import context_length

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    info = ModelInfo("bench", "-", "-", "-", "cpu", dtype, context_length(model.config))
    # No express lane: the breakdown is per step of the main batch, and short prompts
    # of a burst would otherwise run some of their steps in the express lane (counted
    # in decode_step and bookkeeping, not in forward nor steps).
    engine: Any = BatchingEngine(
        model,
        tokenizer,
        info,
        max_batch_size=rows,
        fast_decode=fast,
        express_max_new_tokens=0,
        threads=threads,
        pack_fp32=pack_fp32,
    )
    sections = _Sections()
    shares: dict[str, float] = {}
    step = engine._main.fast if engine._main.fast is not None else engine._forward
    decode = engine._decode
    # Profile a mid-run step: a full batch and a warm allocator.
    profile_at = max(2, min(16, max(p.max_new_tokens for p in prompts[:rows]) // 2))

    def forward(*args: Any) -> Any:
        sections.steps += 1
        sections.rows += engine._main.batch.rows
        if sections.steps == profile_at and not shares:
            out: list[Any] = []
            start = time.perf_counter()
            shares.update(_profile_shares(lambda: out.append(step(*args))))
            sections.profiled_ms = (time.perf_counter() - start) * 1000
            return out[0]
        return step(*args)

    def decoding(lane: Any) -> None:
        sections.in_decode = True
        try:
            decode(lane)
        finally:
            sections.in_decode = False

    if engine._main.fast is not None:
        engine._main.fast = sections.wrap("forward", forward, decode_only=True)
    else:
        engine._forward = sections.wrap("forward", forward, decode_only=True)
    engine._decode = sections.wrap("decode_step", decoding, decode_only=False)
    # Choosing and recording are module functions the engine calls by name.
    namespace = vars(batching)
    originals = {name: namespace[name] for name in ("choose", "record")}
    namespace["choose"] = sections.wrap("sampling", originals["choose"], decode_only=True)
    namespace["record"] = sections.wrap("record", originals["record"], decode_only=True)
    engine._retire = sections.wrap("retire", engine._retire, decode_only=False)
    engine._prefill = sections.wrap("prefill", engine._prefill, decode_only=False)
    try:
        start = time.perf_counter()
        futures = [
            engine.submit(
                GenerationRequest(
                    id=f"breakdown-{i}",
                    prompt=p.text,
                    params=GenerationParams(max_new_tokens=p.max_new_tokens, do_sample=False),
                    seed=0,
                )
            )
            for i, p in enumerate(prompts[:rows])
        ]
        tokens = sum(f.result().completion_tokens for f in futures)
        seconds = time.perf_counter() - start
    finally:
        engine.close()
        namespace.update(originals)
    ms, steps = sections.ms, max(1, sections.steps)
    per_step = {k: v / steps for k, v in ms.items() if k != "prefill"}
    if sections.profiled_ms:  # the profiled step's forward (profiler included) left out
        for key in ("forward", "decode_step"):
            per_step[key] = (ms[key] - sections.profiled_ms) / max(1, steps - 1)
    forward_ms = per_step.get("forward", 0.0)
    bookkeeping = (
        per_step.get("decode_step", 0.0)
        - forward_ms
        - per_step.get("sampling", 0.0)
        - per_step.get("record", 0.0)
    )
    return {
        "path": "fast" if fast else "generic",
        "rows_mean": round(sections.rows / max(1, sections.steps), 1),
        "steps": sections.steps,
        "tokens_per_s": round(tokens / seconds, 1),
        "decode_step_ms": round(per_step.get("decode_step", 0.0) + per_step.get("retire", 0.0), 2),
        "forward_ms": round(forward_ms, 2),
        "matmul_ms": round(forward_ms * shares.get("matmul", 0.0), 2),
        "attention_ms": round(forward_ms * shares.get("attention", 0.0), 2),
        "other_ops_ms": round(forward_ms * shares.get("other_ops", 0.0), 2),
        "python_ms": round(forward_ms * shares.get("python", 0.0), 2),
        "sampling_ms": round(per_step.get("sampling", 0.0), 2),
        "bookkeeping_ms": round(
            max(0.0, bookkeeping) + per_step.get("record", 0.0) + per_step.get("retire", 0.0), 2
        ),
        "prefill_ms_total": round(ms.get("prefill", 0.0), 1),
    }


def packs_fp32(worker_env: Sequence[str]) -> bool:
    """Whether genq's worker packs fp32 weights (``GENQ_FP32_PRODUCTS`` as ``--worker-env``
    sets it, else the default, ``packed``)."""
    values = [e.split("=", 1)[1] for e in worker_env if e.startswith("GENQ_FP32_PRODUCTS=")]
    return (values[-1] if values else "packed") == "packed"


def running_rows(worker_env: Sequence[str], jobs: int, default: int = 64) -> int:
    """The running batch genq's worker gets: GENQ_MAX_BATCH_SIZE (as ``--worker-env``
    sets it, else the bench's ``default``), at most the number of jobs."""
    sizes = [int(e.split("=", 1)[1]) for e in worker_env if e.startswith("GENQ_MAX_BATCH_SIZE=")]
    return min(jobs, sizes[-1] if sizes else default)


def measure(
    model_dir: Any,
    prompts: Sequence[Prompt],
    rates: dict[str, dict[str, float]],
    rows: int,
    threads: int,
    pack_fp32: bool = True,
) -> dict[str, Any]:
    """Per dtype of ``rates`` (``{dtype: {system: tokens/s}}``): the ceiling at ``rows``,
    each system's share of it, and the engine's decode-step breakdown (fast path, and the
    generic one for comparison; fp32 weights packed as the worker's, ``pack_fp32``), each
    with ``threads`` torch threads on a thread of its own (call it from a thread that runs
    none: :mod:`bench._threads`)."""
    import gc

    from bench import _hf, _report, _threads

    out: dict[str, Any] = {"cpu_flags": cpu_flags(), "rows": rows}
    # The breakdown needs a few dozen steps of a full batch, not the whole workload.
    short = [
        dataclasses.replace(p, max_new_tokens=min(p.max_new_tokens, BREAKDOWN_STEPS))
        for p in prompts
    ]
    for dtype, systems in rates.items():
        model, tokenizer = _hf.load(model_dir, dtype)
        _report.step(f"hardware {dtype}: matrix-product ceiling at {rows} rows")
        ceiling = _threads.on_own_thread(functools.partial(matmul_ceiling, model, rows), threads)
        figures: dict[str, Any] = {
            "ceiling_tokens_per_s": round(ceiling.tokens_per_s, 1),
            "ceiling_step_ms": round(ceiling.linear_ms, 2),
            "share_of_ceiling": {
                name: round(rate / ceiling.tokens_per_s, 3) for name, rate in systems.items()
            },
        }
        if ceiling.packed_tokens_per_s is not None:
            figures["packed_ceiling_tokens_per_s"] = round(ceiling.packed_tokens_per_s, 1)
        for fast in (True, False):
            path = "fast" if fast else "generic"
            _report.step(f"hardware {dtype}: decode-step breakdown, {path} path")
            figures[f"breakdown_{path}"] = step_breakdown(
                model, tokenizer, short, rows, fast=fast, threads=threads, pack_fp32=pack_fp32
            )
        out[dtype] = figures
        del model
        gc.collect()
    return out


_PARTS = [
    ("matmul_ms", "matrix products"),
    ("attention_ms", "attention"),
    ("other_ops_ms", "other tensor ops (norms, adds, activations, embeddings)"),
    ("python_ms", "Python and dispatch inside the forward"),
    ("sampling_ms", "sampling (choosing tokens)"),
    ("bookkeeping_ms", "bookkeeping (step inputs, cache, tokens, stop checks, retiring)"),
]


def print_report(hardware: dict[str, Any]) -> None:
    """The ceiling, each system's share of it and the breakdown, with the CPU flags."""
    from rich.table import Table

    from bench._report import console

    rows, flags = hardware["rows"], hardware["cpu_flags"]
    for dtype in (k for k in hardware if k not in ("cpu_flags", "rows")):
        figures = hardware[dtype]
        packed = figures.get("packed_ceiling_tokens_per_s")
        line = (
            f"{dtype}: matrix-product ceiling at {rows} rows "
            f"{figures['ceiling_tokens_per_s']:.0f} tokens/s (F.linear)"
        )
        if packed is not None:
            line += f", {packed:.0f} with weights packed once"
        shares = ", ".join(f"{k} {v:.2f}" for k, v in figures["share_of_ceiling"].items())
        line += f"; share of the F.linear ceiling: {shares}"
        if packed is not None:
            rates = figures["share_of_ceiling"].items()
            of_packed = (
                f"{k} {v * figures['ceiling_tokens_per_s'] / packed:.2f}" for k, v in rates
            )
            line += f"; of the packed one: {', '.join(of_packed)}"
        console.print(line)
        table = Table(title=f"one decode step at ~{rows} rows, {dtype} (ms)")
        table.add_column("part")
        for path in ("fast", "generic"):
            table.add_column(f"{path} path", justify="right")
        fast, generic = figures["breakdown_fast"], figures["breakdown_generic"]
        for key, label in _PARTS:
            table.add_row(label, f"{fast[key]:.1f}", f"{generic[key]:.1f}")
        table.add_row(
            "whole step", f"{fast['decode_step_ms']:.1f}", f"{generic['decode_step_ms']:.1f}"
        )
        table.add_row(
            "engine in process, tokens/s",
            f"{fast['tokens_per_s']:.0f}",
            f"{generic['tokens_per_s']:.0f}",
        )
        console.print(table)
    console.print(f"[dim]CPU flags: {flags}[/dim]")


def min_step_ms(model: Any, rows: int, prompt: int = 30, repeats: int = 16) -> dict[str, float]:
    """The fastest of ``repeats`` decode steps of each path, interleaved, on a slot cache
    of ``rows`` rows of ``prompt`` random tokens: on a busy machine the minimum is the
    figure least disturbed by other work. ``{"fast": ms, "generic": ms}``."""
    import torch
    from transformers import DynamicCache

    from worker.engine import fastpath
    from worker.engine.kvcache import SlotCache

    with torch.inference_mode():
        batch = SlotCache(model.config, rows)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (rows, prompt), generator=generator)
        mask = torch.ones_like(ids)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        batch.admit(cache, mask, torch.zeros(rows, dtype=torch.long))
        fast = fastpath.decode_step_for(model, batch, max_rows=rows, pack_fp32=True)
        if fast is None:
            raise ValueError("no fast decode step for this model")

        def generic(ids: Any, mask: Any, positions: Any) -> Any:
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=batch.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1].float()

        paths: dict[str, Callable[..., Any]] = {"fast": fast, "generic": generic}
        best = dict.fromkeys(paths, float("inf"))
        for k in range(repeats):
            for name in list(paths) if k % 2 == 0 else list(paths)[::-1]:
                inputs = batch.step_inputs()
                start = time.perf_counter()
                logits = paths[name](*inputs)
                best[name] = min(best[name], (time.perf_counter() - start) * 1000)
                batch.advance(logits.argmax(-1))
    return best
