"""Decode speed side by side, in process, interleaved: for when the machine is too busy
for ``bench.throughput``'s end-to-end runs to finish or to mean much.

    python -m bench.speed_ab [--prompts 32] [--new 24] [--rounds 2] [--dtypes float32,bfloat16]

On ``bench.throughput``'s model and uniform prompts, each round runs, one after the
other: transformers' static batching (one ``generate`` over all prompts, left padded),
the engine with its fast decode step and the engine with the generic one (the model's
own forward). Rounds alternate the order, so a change in the machine's load hits every
system alike; the best round of each is kept and the ratios printed with the load
average and the CPU flags. No HTTP, broker or database: the engine's share only.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import _hardware, _hf, _threads
from bench._cpu import cpu_flags
from bench._workload import Prompt, build_model_dir, workload_prompts


def _engine_run(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], fast: bool, threads: int
) -> float:
    from core.schemas import GenerationParams
    from worker.engine.base import GenerationRequest, ModelInfo
    from worker.engine.batching import BatchingEngine

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    info = ModelInfo("bench", "-", "-", "-", "cpu", dtype, 1024)
    engine = BatchingEngine(
        model, tokenizer, info, max_batch_size=len(prompts), fast_decode=fast, threads=threads
    )
    try:
        start = time.perf_counter()
        futures = [
            engine.submit(
                GenerationRequest(
                    id=f"ab-{i}",
                    prompt=p.text,
                    params=GenerationParams(max_new_tokens=p.max_new_tokens, do_sample=False),
                    seed=0,
                )
            )
            for i, p in enumerate(prompts)
        ]
        tokens = sum(f.result().completion_tokens for f in futures)
        return tokens / (time.perf_counter() - start)
    finally:
        engine.close()


def _rounds(
    dtype: str, model: Any, tokenizer: Any, prompts: Sequence[Prompt], rounds: int, threads: int
) -> dict[str, float]:
    """Each system's best tokens/s over ``rounds`` rounds, the order alternating; each on
    a thread of its own with ``threads`` torch threads (:mod:`bench._threads`)."""
    eos = tokenizer.eos_token_id

    def static() -> float:
        return _hf.static_batch(model, prompts, eos, len(prompts)).tokens_per_s

    systems: dict[str, Callable[[], float]] = {
        "static_batch": lambda: _threads.on_own_thread(static, threads),
        "engine_fast": lambda: _engine_run(model, tokenizer, prompts, True, threads),
        "engine_generic": lambda: _engine_run(model, tokenizer, prompts, False, threads),
    }
    best: dict[str, float] = {}
    for round_ in range(rounds):
        order = list(systems) if round_ % 2 == 0 else list(systems)[::-1]
        for name in order:
            rate = systems[name]()
            best[name] = max(best.get(name, 0.0), rate)
            load = os.getloadavg()[0]
            print(f"{dtype} round {round_} {name}: {rate:.1f} tok/s (load {load:.1f})", flush=True)
    return best


def _print_steps(dtype: str, model: Any, rows: int, threads: int) -> None:
    steps = _threads.on_own_thread(lambda: _hardware.min_step_ms(model, rows), threads)
    ceiling = _threads.on_own_thread(
        lambda: _hardware.matmul_ceiling(model, rows, repeats=10), threads
    )
    packed = f", packed {ceiling.packed_ms:.1f} ms" if ceiling.packed_ms else ""
    print(
        f"{dtype}, {rows} rows: fastest step fast {steps['fast']:.1f} ms"
        f" ({rows / steps['fast'] * 1000:.0f} tok/s), generic {steps['generic']:.1f} ms"
        f" ({rows / steps['generic'] * 1000:.0f} tok/s), generic/fast"
        f" {steps['generic'] / steps['fast']:.2f}x; F.linear alone {ceiling.linear_ms:.1f} ms"
        f"{packed} (load {os.getloadavg()[0]:.1f})",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; asserts nothing."""
    parser = argparse.ArgumentParser(prog="python -m bench.speed_ab", description=__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=24, help="new tokens per prompt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--steps-only",
        action="store_true",
        help="only the fastest decode step of each path (min of 16, interleaved) and the ceiling",
    )
    args = parser.parse_args(argv)

    import dataclasses

    from transformers import AutoTokenizer

    _threads.single_threaded_main()  # each measurement on a thread of its own
    print(f"CPU flags: {cpu_flags()}")
    with tempfile.TemporaryDirectory(prefix="genq-ab-") as tmp:
        model_dir, _ = build_model_dir(Path(tmp) / "gpt2-random")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = [
            dataclasses.replace(p, max_new_tokens=args.new)
            for p in workload_prompts(tokenizer, "uniform", args.prompts, 0)
        ]
        eos = tokenizer.eos_token_id
        for dtype in args.dtypes.split(","):
            model, tokenizer = _hf.load(model_dir, dtype)
            if args.steps_only:
                _print_steps(dtype, model, args.prompts, args.threads)
                continue
            _threads.on_own_thread(
                functools.partial(_hf.warm_up, model, prompts, eos), args.threads
            )
            best = _rounds(dtype, model, tokenizer, prompts, args.rounds, args.threads)
            ceiling = _threads.on_own_thread(
                functools.partial(_hardware.matmul_ceiling, model, len(prompts)),
                args.threads,
            )
            static = best["static_batch"]
            print(
                f"{dtype} best: "
                + ", ".join(f"{k} {v:.1f}" for k, v in best.items())
                + f"; engine_fast/static {best['engine_fast'] / static:.2f}x"
                + f", engine_generic/static {best['engine_generic'] / static:.2f}x"
                + f"; F.linear ceiling {ceiling.tokens_per_s:.0f} tok/s"
                + (
                    f" (packed {ceiling.packed_tokens_per_s:.0f})"
                    if ceiling.packed_tokens_per_s
                    else ""
                ),
                flush=True,
            )
            del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
