"""What structured output costs: constrained vs free tokens/s in the same run.

A random-weight GPT-2 (``GPT2Config()``, the 124M shape; ``--layers`` for a smaller
one) with the real GPT-2 tokenizer (50,257 tokens, the mask's width), fp32 on CPU,
through the BatchingEngine. Every run submits ``--rows`` requests at once with the
same prompts and ``max_new_tokens``; the schemas never close before that length
(an open array, an open string), so every row makes the same number of tokens and
the runs differ only by the masks:

- ``free``: no constraint;
- ``string``: ``{"text": "<string>"}`` (inside a string nearly every token is allowed);
- ``nested``: an open array of objects with an integer, an enum and a short string
  (the lexer changes state often: the dearer masks);
- ``mixed``: half ``free``, half ``nested``, sharing decode steps.

Then the mask alone (llguidance's bitmask, its unpacking and the token's
consumption) per row and step, outside the engine.

The workloads run in turn, ``--rounds`` times (alternating order), and each figure is
the median over rounds: on a shared, noisy machine that keeps the ratios side by side.

    python -m bench.constrained [--rows 32] [--new 64] [--threads 2] [--layers 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench._cpu import cpu_flags
from core.schemas import GenerationParams
from worker.engine.base import GenerationRequest, ModelInfo
from worker.engine.batching import BatchingEngine

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"
WORDS = "the a cat dog ran over hill when blue sky river quickly sat under old tree".split()  # noqa: SIM905
STRING = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
NESTED = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "label": {"enum": ["cat", "dog", "bird", "none"]},
            "note": {"type": "string", "maxLength": 8},
        },
        "required": ["id", "label", "note"],
        "additionalProperties": False,
    },
}


def build(tokenizer_dir: Path, layers: int) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model: Any = GPT2LMHeadModel(GPT2Config(n_layer=layers))
    model.eval()
    return model, tokenizer


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


def run(engine: BatchingEngine, prompts: list[str], formats: list[Any], new: int) -> float:
    """Generated tokens per second for the prompts submitted at once."""
    start = time.perf_counter()
    futures = [
        engine.submit(
            GenerationRequest(
                id=f"r{i}-{time.monotonic_ns()}",
                prompt=p,
                params=GenerationParams(max_new_tokens=new, response_format=f),
                seed=i,
            )
        )
        for i, (p, f) in enumerate(zip(prompts, formats, strict=True))
    ]
    tokens = sum(f.result().completion_tokens for f in futures)
    return tokens / (time.perf_counter() - start)


def mask_cost(engine: BatchingEngine, schema: dict[str, Any], steps: int) -> float:
    """Milliseconds per row and step for the mask and the advance alone."""
    params = GenerationParams(response_format=fmt(schema))
    constraint = engine._grammar.constraint_for(params, 1)
    assert constraint is not None
    draws = [torch.randn(1, engine._grammar.vocab) for _ in range(steps)]  # not timed
    start = time.perf_counter()
    for logits in draws:
        token = int(constraint.mask(logits).argmax())
        constraint.consume(0, token)
    return (time.perf_counter() - start) * 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build(args.tokenizer, args.layers)
    info = ModelInfo("gpt2-random", "none", torch.__version__, "", "cpu", "float32", 1024)
    engine = BatchingEngine(model, tokenizer, info, max_batch_size=args.rows)
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(16)) for _ in range(args.rows)]
    half = args.rows // 2
    workloads: dict[str, list[Any]] = {
        "free": [None] * args.rows,
        "string": [fmt(STRING)] * args.rows,
        "nested": [fmt(NESTED)] * args.rows,
        "mixed": [None] * half + [fmt(NESTED)] * (args.rows - half),
    }
    try:
        run(engine, prompts[:4], workloads["nested"][:4], 8)  # warm-up, llguidance tokenizer
        samples: dict[str, list[float]] = {name: [] for name in workloads}
        for round_ in range(args.rounds):
            order = list(workloads) if round_ % 2 == 0 else list(reversed(workloads))
            for name in order:
                samples[name].append(run(engine, prompts, workloads[name], args.new))
        rates = {name: statistics.median(values) for name, values in samples.items()}
        schemas = (("string", STRING), ("nested", NESTED))
        masks = {name: mask_cost(engine, s, 200) for name, s in schemas}
    finally:
        engine.close()
    flags = cpu_flags()
    print(
        f"GPT-2 shape, {args.layers} layers, fp32, {args.threads} threads, "
        f"{args.rows} rows x {args.new} new tokens, median of {args.rounds} rounds; "
        f"CPU flags: {flags}"
    )
    for name, rate in rates.items():
        print(f"  {name:7s} {rate:8.1f} tok/s  {rate / rates['free']:.2f}x free")
    for name, ms in masks.items():
        print(f"  mask+advance alone, {name}: {ms:.3f} ms per row-step")


if __name__ == "__main__":
    main()
