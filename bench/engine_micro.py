"""Throughput of the BatchingEngine against transformers' generate, side by side.

A random-weight ``GPT2Config()`` model (the real GPT-2 124M shape and cost) with
the real GPT-2 tokenizer from ``../shared/models/gpt2-tokenizer``, fp32 on CPU.

    python bench/engine_micro.py [--threads 2] [--prompts 64] [--new 64]

Prints tokens/s for: one-at-a-time ``generate`` (a subset), static ``generate``
batches of 16/32/64 (left padding), and the BatchingEngine with every request
submitted at once; then a "mixed" workload (max_new_tokens 8..128, prompt
lengths 8..200) for static batching and the engine. Only generated tokens count.
Targets: engine >= 0.95x best static (uniform) and >= 1.3x static (mixed).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.schemas import GenerationParams
from worker.engine.base import GenerationRequest, ModelInfo
from worker.engine.batching import BatchingEngine

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"
WORDS = "the a cat dog ran over hill when blue sky river quickly sat under old tree and".split()  # noqa: SIM905 (a sentence reads better)


def build() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model: Any = GPT2LMHeadModel(GPT2Config())
    model.eval()
    # Random weights almost never produce eos, so every job runs to its length;
    # eos would only shorten the static runs' useful work further.
    model.generation_config.eos_token_id = None
    return model, tokenizer


def prompt_of(rng: random.Random, tokens: int, tokenizer: Any) -> str:
    """A prompt of exactly ``tokens`` tokens (words are single GPT-2 tokens)."""
    text = " ".join(rng.choice(WORDS) for _ in range(tokens))
    ids = tokenizer(text)["input_ids"][:tokens]
    return str(tokenizer.decode(ids))


def static(model: Any, tokenizer: Any, jobs: list[tuple[str, int]], batch: int) -> float:
    """Static batching: chunks of ``batch`` run to their longest max_new_tokens."""
    made = 0
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        inputs = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(
                **inputs,
                max_new_tokens=max(n for _, n in chunk),
                min_new_tokens=max(n for _, n in chunk),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        # Only the tokens each job asked for are useful output.
        made += sum(n for _, n in chunk)
    return made / (time.perf_counter() - start)


def engine_run(engine: BatchingEngine, jobs: list[tuple[str, int]]) -> float:
    start = time.perf_counter()
    futures = [
        engine.submit(
            GenerationRequest(
                id=f"j{i}-{start}", prompt=p, params=GenerationParams(max_new_tokens=n), seed=0
            )
        )
        for i, (p, n) in enumerate(jobs)
    ]
    made = sum(f.result().completion_tokens for f in futures)
    return made / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument(
        "--hardware", action="store_true", help="also the matmul ceiling and a step breakdown"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build()
    info = ModelInfo("gpt2-random", "-", torch.__version__, "-", "cpu", "float32", 1024)
    rng = random.Random(0)
    uniform = [(prompt_of(rng, args.prompt_tokens, tokenizer), args.new)] * 0 + [
        (prompt_of(rng, args.prompt_tokens, tokenizer), args.new) for _ in range(args.prompts)
    ]
    mixed = [
        (prompt_of(rng, rng.randint(8, 200), tokenizer), rng.randint(8, 128))
        for _ in range(args.prompts)
    ]
    engine = BatchingEngine(model, tokenizer, info, max_batch_size=args.prompts)
    engine.eos_ids = frozenset()  # as generate above: every job runs to its length
    engine_run(engine, uniform[:4])  # warm-up
    results: dict[str, float] = {}
    print(f"threads={args.threads} prompts={args.prompts} new={args.new} (tokens/s)")
    if not args.skip_static:
        results["uniform one-at-a-time"] = static(model, tokenizer, uniform[:8], 1)
        print(f"  uniform one-at-a-time (8) {results['uniform one-at-a-time']:8.1f}", flush=True)
        for batch in (16, 32, 64):
            results[f"uniform static {batch}"] = static(model, tokenizer, uniform, batch)
            print(
                f"  uniform static {batch:<3}        {results[f'uniform static {batch}']:8.1f}",
                flush=True,
            )
    results["uniform engine"] = engine_run(engine, uniform)
    print(f"  uniform engine            {results['uniform engine']:8.1f}", flush=True)
    if not args.skip_static:
        results["mixed static 64"] = static(model, tokenizer, mixed, 64)
        print(f"  mixed static 64           {results['mixed static 64']:8.1f}", flush=True)
    results["mixed engine"] = engine_run(engine, mixed)
    print(f"  mixed engine              {results['mixed engine']:8.1f}", flush=True)
    engine.close()
    if not args.skip_static:
        best = max(results[f"uniform static {b}"] for b in (16, 32, 64))
        print(f"uniform: engine / best static = {results['uniform engine'] / best:.2f} (>= 0.95)")
        ratio = results["mixed engine"] / results["mixed static 64"]
        print(f"mixed:   engine / static 64   = {ratio:.2f} (>= 1.3)")
        one = results["uniform one-at-a-time"]
        print(f"uniform: engine / one-at-a-time = {results['uniform engine'] / one:.2f}")
    if args.hardware:
        print_hardware(model, tokenizer, uniform, results["uniform engine"])


def print_hardware(model: Any, tokenizer: Any, jobs: list[tuple[str, int]], engine: float) -> None:
    """The uniform run's share of the matrix-product ceiling, and where a step's time goes."""
    from bench import _hardware
    from bench._cpu import cpu_flags
    from bench._workload import Prompt

    rows = len(jobs)
    ceiling = _hardware.matmul_ceiling(model, rows)
    print(f"CPU flags: {cpu_flags()}")
    print(
        f"matrix-product ceiling at {rows} rows: {ceiling.tokens_per_s:.0f} tokens/s; "
        f"uniform engine share {engine / ceiling.tokens_per_s:.2f}"
    )
    prompts = [Prompt(text=p, ids=(), max_new_tokens=n) for p, n in jobs]
    for fast in (True, False):
        parts = _hardware.step_breakdown(model, tokenizer, prompts, rows, fast=fast)
        print(f"  decode step ({parts.pop('path')} path): {parts}")


if __name__ == "__main__":
    main()
