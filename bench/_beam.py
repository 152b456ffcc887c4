"""The ``beam`` workload: the seed's own call, ``generate(max_length=50, num_beams=5,
early_stopping=True)``, on every prompt, and a short greedy job behind it.

Side by side in one run, on the bench's GPT-2 124M (fp32, 2 threads) and prompts of
14-24 tokens: the seed's loop (one ``generate`` per prompt), transformers' static batched
beam search (consecutive groups of 8/16/32 prompts, left padded, one ``generate`` each;
the best size counts) and genq end to end (HTTP API → Redis → worker → PostgreSQL). Then
the latency of a 4-token greedy job on the idle worker, and submitted right behind all
the beam jobs. Tokens are those of the returned (best) sequence of each prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import _genq, _hf, _report, _services
from bench._cpu import cpu_flags
from bench._workload import Prompt, build_model_dir, make_prompts

SEED_CALL: dict[str, Any] = {"max_length": 50, "num_beams": 5, "early_stopping": True}
# Before-and-after figures further apart than this: the ratios of the run are not reliable.
DRIFT_WARNING = 0.10
SHORT_JOB: dict[str, Any] = {"prompt": "a short greedy job", "max_new_tokens": 4}
Stack = tuple[dict[str, str], str, _services.GenqProcess]
StackFactory = Callable[
    [Path, Path, str, int, dict[str, str] | None], contextlib.AbstractContextManager[Stack]
]
WorkerFactory = Callable[
    [dict[str, str], Path, str, _services.GenqProcess, float],
    contextlib.AbstractContextManager[_services.GenqProcess],
]


def _beam_generate(model: Any, batch: Sequence[Prompt], eos: int) -> int:
    """One left-padded ``generate`` with the seed's arguments; the new tokens of each
    prompt's returned sequence (padding and anything after eos excluded)."""
    import torch

    width = max(len(p.ids) for p in batch)
    ids = torch.full((len(batch), width), eos, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p.ids) :] = torch.tensor(p.ids)
        mask[row, width - len(p.ids) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, pad_token_id=eos, eos_token_id=eos, **SEED_CALL
        )
    # max_length counts the padding too: in a batch, shorter prompts get fewer new tokens.
    return sum(_hf._generated(row, eos, len(row)) for row in out[:, width:].tolist())


def measure_transformers(
    model_dir: Path, prompts: Sequence[Prompt], sizes: Sequence[int], seed_jobs: int
) -> dict[str, _hf.Measured]:
    """The seed's loop on the first ``seed_jobs`` prompts, and static batches of each size."""
    model, tokenizer = _hf.load(model_dir, "float32")
    eos = tokenizer.eos_token_id
    _beam_generate(model, prompts[:2], eos)  # warm-up
    out: dict[str, _hf.Measured] = {}
    _report.step(f"seed_loop: {seed_jobs} prompts, one generate each")
    start = time.perf_counter()
    tokens = sum(_beam_generate(model, [p], eos) for p in prompts[:seed_jobs])
    out["seed_loop"] = _hf.Measured(tokens, time.perf_counter() - start, seed_jobs)
    _report.step(f"seed_loop: {out['seed_loop'].tokens_per_s:.1f} tokens/s")
    for size in sizes:
        start = time.perf_counter()
        tokens = sum(
            _beam_generate(model, prompts[i : i + size], eos) for i in range(0, len(prompts), size)
        )
        measured = out[f"static_batch_{size}"] = _hf.Measured(
            tokens, time.perf_counter() - start, len(prompts)
        )
        _report.step(f"static_batch ({size}): {measured.tokens_per_s:.1f} tokens/s")
    del model
    gc.collect()
    return out


def _short_job_s(client: httpx.Client, timeout: float) -> tuple[float, float]:
    """Submit-to-finished of one short greedy job, and its part before a worker took
    it (submit-to-started), from its row (server clocks)."""
    # Its times come from its row, so a coarse poll loses nothing and, unlike a 2 ms
    # one, does not take CPU from the worker it measures.
    _, job = _genq.run_one(client, SHORT_JOB, timeout, poll_s=0.05)
    created = _genq.epoch(job["created_at"])
    return _genq.epoch(job["finished_at"]) - created, _genq.epoch(job["started_at"]) - created


def measure_genq(
    stack: Stack,
    start_worker: WorkerFactory,
    prompts: Sequence[Prompt],
    args: argparse.Namespace,
    log: Path,
) -> tuple[_genq.RunFigures, float, list[float]]:
    """genq on every prompt with the seed's call; the short job's latency idle, and
    behind the beam jobs in each of ``args.behind_rounds`` rounds (the first round's
    beam jobs give the throughput; a latency's tail is noisy, so one sample says little)."""
    env, url, api = stack
    with (
        start_worker(env, log, url, api, args.timeout) as worker,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        idle_runs = [_short_job_s(client, args.timeout) for _ in range(5)]
        idle = statistics.median(total for total, _ in idle_runs)
        idle_wait = statistics.median(wait for _, wait in idle_runs)
        _report.step(
            f"short job on the idle worker: {idle * 1000:.0f} ms"
            f" ({idle_wait * 1000:.0f} ms of it before a worker took it)"
        )
        bodies = [{"prompt": p.text, **SEED_CALL} for p in prompts]
        behind: list[float] = []
        for round_ in range(max(args.behind_rounds, 1)):
            start, ids, _ = _genq.submit_all(url, bodies, args.concurrency)
            total, wait = _short_job_s(client, args.timeout)
            behind.append(total)
            _report.step(
                f"round {round_ + 1}: short job behind {len(prompts)} beam jobs:"
                f" {total * 1000:.0f} ms ({wait * 1000:.0f} ms of it before a worker took it)"
            )
            _genq.wait_all_final(client, args.timeout, worker, api)
            if round_ == 0:
                jobs = _genq.fetch_all(client)
                run = _genq.figures(start, [jobs[i] for i in ids])
    _report.step(f"genq: {run.tokens_per_s:.1f} tokens/s ({run.failed} jobs not succeeded)")
    return run, idle, behind


def run(
    args: argparse.Namespace,
    tmp: Path,
    log_dir: Path,
    genq_stack: StackFactory,
    start_worker: WorkerFactory,
) -> dict[str, Any]:
    """The whole workload; ``genq_stack`` and ``start_worker`` are bench.throughput's."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    model_dir, tokenizer_kind = build_model_dir(tmp / "gpt2-random", seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(
        tokenizer, args.jobs, prompt_len=(14, 24), new_tokens=(1, 1), seed=args.seed
    )
    sizes = [int(s) for s in (args.batch_sizes or "8,16,32").split(",")]
    hf = measure_transformers(model_dir, prompts, sizes, args.seed_loop_jobs)
    best = max(sizes, key=lambda s: hf[f"static_batch_{s}"].tokens_per_s)
    # genq runs as many rows per forward as the largest static batch tried (num_beams
    # rows per prompt), unless --worker-env says otherwise: the same matrix sizes.
    rows = max(sizes) * SEED_CALL["num_beams"]
    extra = {"GENQ_MAX_BATCH_SIZE": str(rows), **dict(e.split("=", 1) for e in args.worker_env)}
    _report.step(f"genq: GENQ_MAX_BATCH_SIZE={extra['GENQ_MAX_BATCH_SIZE']} rows")
    with genq_stack(tmp, log_dir, str(model_dir), 1, extra) as stack:
        log = log_dir / "worker-beam.log"
        genq, idle, behind_rounds = measure_genq(stack, start_worker, prompts, args, log)
    behind = statistics.median(behind_rounds)
    # The machine is shared: the seed's loop and the best static size run again after
    # genq, and genq is compared with the mean of before and after; how much they moved
    # says whether the machine stayed the same through the run.
    _report.step("again after genq: the seed's loop and the best static size")
    after = measure_transformers(model_dir, prompts, [best], args.seed_loop_jobs)
    seed_both = (hf["seed_loop"].tokens_per_s, after["seed_loop"].tokens_per_s)
    static_both = (
        hf[f"static_batch_{best}"].tokens_per_s,
        after[f"static_batch_{best}"].tokens_per_s,
    )
    seed_rate, static_rate = statistics.mean(seed_both), statistics.mean(static_both)
    return {
        "workload": "beam",
        "call": SEED_CALL,
        "jobs": len(prompts),
        "tokenizer": tokenizer_kind,
        "tokens_per_s": {
            "seed_loop": round(seed_rate, 2),
            **{f"static_batch_{s}": round(hf[f"static_batch_{s}"].tokens_per_s, 2) for s in sizes},
            "genq": round(genq.tokens_per_s, 2),
            "seed_loop_after": round(seed_both[1], 2),
            f"static_batch_{best}_after": round(static_both[1], 2),
        },
        # after / before - 1 of the same measurement: the machine's drift through the run.
        "drift": {
            "seed_loop": round(seed_both[1] / seed_both[0] - 1, 3),
            "static_batch": round(static_both[1] / static_both[0] - 1, 3),
        },
        "static_batch_best_size": best,
        "ratios": {
            "genq_vs_seed_loop": round(genq.tokens_per_s / seed_rate, 3),
            "genq_vs_static_batch": round(genq.tokens_per_s / static_rate, 3),
            "short_job_behind_vs_idle": round(behind / idle, 2),
        },
        "short_job_ms": {
            "idle": round(idle * 1000),
            "behind_beams": round(behind * 1000),
            "behind_beams_rounds": [round(b * 1000) for b in behind_rounds],
        },
        "genq_max_batch_size": int(extra["GENQ_MAX_BATCH_SIZE"]),
        "cpu_flags": cpu_flags(),
        "genq_failed_jobs": genq.failed,
        "genq_seconds": round(genq.seconds, 1),
    }


def print_result(result: dict[str, Any]) -> None:
    """The figures and ratios, with the targets of issue 10."""
    rates, ratios = result["tokens_per_s"], result["ratios"]
    console = _report.console
    console.print(f"beam workload: {result['jobs']} prompts, generate({result['call']})")
    console.print(f"CPU flags: {result['cpu_flags']}; genq rows: {result['genq_max_batch_size']}")
    for system, rate in rates.items():
        console.print(f"  {system:<22} {rate:8.1f} tokens/s")
    drift = result["drift"]
    console.print(
        f"the same measurements after genq moved by {drift['seed_loop']:+.0%} (seed loop) and"
        f" {drift['static_batch']:+.0%} (static); genq is compared with their means"
    )
    if max(abs(d) for d in drift.values()) > DRIFT_WARNING:
        console.print("[yellow]the machine changed during the run: run it again[/yellow]")
    console.print(
        f"genq vs seed_loop {ratios['genq_vs_seed_loop']:.2f}x (target ≥ 4x), "
        f"vs static_batch (best size {result['static_batch_best_size']}) "
        f"{ratios['genq_vs_static_batch']:.2f}x (target ≥ 1.0x)"
    )
    short = result["short_job_ms"]
    console.print(
        f"short greedy job: idle {short['idle']} ms, behind the beam jobs {short['behind_beams']}"
        f" ms (median of {short['behind_beams_rounds']})"
        f" = {ratios['short_job_behind_vs_idle']:.1f}x (target ≤ 3x)"
    )
    if result["genq_failed_jobs"]:
        console.print(f"[red]{result['genq_failed_jobs']} genq jobs did not succeed[/red]")
