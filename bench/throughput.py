"""Throughput of genq against plain transformers, on the same model and prompts.

``python -m bench.throughput --workload uniform|mixed|plumbing|beam [--jobs N] [--json OUT]``

``uniform`` and ``mixed`` measure, one after the other on this machine, the seed's
one-prompt-at-a-time loop, transformers' static batching (16, 32, 64) and genq end to
end (HTTP API → Redis → ``genq worker`` → PostgreSQL), all on a random-weight GPT-2
124M in fp32 with 2 torch threads. ``plumbing`` pushes many tiny jobs through genq with
the fake engine to measure the queue itself. ``beam`` is the seed's own beam-search call
(bench/_beam.py). It prints figures; it asserts nothing.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import _genq, _hardware, _hf, _http, _report, _services, _threads
from bench._workload import Prompt, Workload, build_model_dir, workload_prompts

DEFAULT_JOBS = {"uniform": 64, "mixed": 64, "plumbing": 2000, "beam": 64}
THREADS = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--workload", choices=[*DEFAULT_JOBS], default="uniform")
    parser.add_argument("--jobs", type=int, help="jobs (default: 64; plumbing 2000)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "both"],
        default="float32",
        help="both: fp32 for everything, plus bf16 for static_batch (best size) and genq",
    )
    parser.add_argument("--seed-loop-jobs", type=int, default=8, help="prompts for seed_loop")
    parser.add_argument(
        "--behind-rounds",
        type=int,
        default=3,
        help="beam: rounds of all the beam jobs with a short job behind them (the median counts)",
    )
    parser.add_argument("--batch-sizes", help="static_batch sizes (16,32,64; beam: 8,16,32)")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights and prompts")
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP submits in flight")
    parser.add_argument(
        "--submit",
        choices=["each", "bulk"],
        default="each",
        help="uniform/mixed: genq's jobs as one POST /v1/jobs each (a web app's way) or in "
        "POST /v1/jobs/bulk requests of --bulk-size (a bulk user's way)",
    )
    parser.add_argument("--api-workers", type=int, help="uvicorn workers (default 1; plumbing 2)")
    parser.add_argument(
        "--bulk-size",
        type=int,
        default=500,
        help="jobs per POST /v1/jobs/bulk (plumbing, --submit bulk)",
    )
    parser.add_argument("--idle-jobs", type=int, default=50, help="plumbing: sequential jobs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for genq")
    parser.add_argument(
        "--settle",
        type=float,
        default=0,
        help="seconds to wait once the worker answered its warm-up job, before the timed "
        "run: what it does in the background at start (compiling attention in bf16, "
        "GENQ_COMPILE_ATTENTION, 5-40 s on 2 cores) then stays out of the figures",
    )
    parser.add_argument(
        "--no-hardware", action="store_true", help="skip the matmul ceiling and step breakdown"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="uniform/mixed in one dtype: static batching and genq alternate this many "
        "times (static first, then genq first, ...) on one loaded model and one settled "
        "worker; each round's ratio is its own pair's, and the median of them is reported",
    )
    parser.add_argument("--log-dir", type=Path, help="keep the api/worker logs here")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the worker, e.g. GENQ_PROGRESS_INTERVAL_S=60 (repeatable)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def genq_stack(
    tmp: Path, log_dir: Path, model: str, api_workers: int, extra: dict[str, str] | None = None
) -> Iterator[tuple[dict[str, str], str, _services.GenqProcess]]:
    """A fresh database and queue, and a running API; yields the env, its URL, the API.
    ``extra`` adds GENQ_* settings for every process."""
    with _services.postgres_database() as db_url, _services.redis_queue() as queue:
        settings = {
            "GENQ_MODEL": model,
            "GENQ_BROKER_URL": _services.REDIS_URL,
            "GENQ_DATABASE_URL": db_url,
            "GENQ_QUEUE": queue,
            "GENQ_MAX_BATCH_SIZE": "64",
            "GENQ_TORCH_THREADS": str(THREADS),
            "GENQ_DATA_DIR": str(tmp / "data"),
            "GENQ_REQUIRE_AUTH": "false",
        }
        env = _services.genq_env(**{**settings, **(extra or {})})
        port = _services.free_port()
        args = ["api", "--port", str(port), "--workers", str(api_workers)]
        with _services.genq_process(args, env, log_dir / "api.log") as api:
            url = f"http://127.0.0.1:{port}"
            _services.wait_until(lambda: _genq.api_ready(url), 60, "the API", api)
            yield env, url, api


def start_worker(
    env: dict[str, str], log: Path, url: str, api: _services.GenqProcess, timeout: float
) -> contextlib.AbstractContextManager[_services.GenqProcess]:
    """A ``genq worker``; entered, it has answered one warm-up job (model loaded)."""

    @contextlib.contextmanager
    def run() -> Iterator[_services.GenqProcess]:
        with _services.genq_process(["worker", "--loglevel=WARNING"], env, log) as worker:
            with httpx.Client(base_url=url, timeout=30) as client:
                body = {"prompt": "warm up the worker", "max_new_tokens": 4}
                job_id = _http.post_many(url, "/v1/jobs", [body], connections=1)[0][0]["id"]

                def done() -> bool:
                    job = _genq.get_json(client, f"/v1/jobs/{job_id}")
                    return job["status"] in _genq.FINAL

                _services.wait_until(done, timeout, "the warm-up job", worker, api)
            yield worker

    return run()


def measure_genq(
    stack: tuple[dict[str, str], str, _services.GenqProcess],
    prompts: Sequence[Prompt],
    dtype: str,
    args: argparse.Namespace,
    log_dir: Path,
) -> _genq.RunFigures:
    """One timed genq run of every prompt with a fresh worker in ``dtype``."""
    with genq_worker(stack, dtype, args, log_dir) as worker:
        return timed_genq_run(stack, worker, prompts, dtype, args, log_dir)


@contextlib.contextmanager
def genq_worker(
    stack: tuple[dict[str, str], str, _services.GenqProcess],
    dtype: str,
    args: argparse.Namespace,
    log_dir: Path,
) -> Iterator[_services.GenqProcess]:
    """A ``genq worker`` in ``dtype`` that answered its warm-up job, then ``--settle`` s."""
    env, url, api = stack
    extra = dict(item.split("=", 1) for item in args.worker_env)
    env = {**env, **extra, "GENQ_DTYPE": dtype}
    with start_worker(env, _worker_log(log_dir, dtype), url, api, args.timeout) as worker:
        if args.settle:
            _report.step(f"genq {dtype}: worker ready; letting it settle {args.settle:.0f} s")
            time.sleep(args.settle)
        yield worker


def _worker_log(log_dir: Path, dtype: str) -> Path:
    return log_dir / f"worker-{dtype}.log"


def timed_genq_run(
    stack: tuple[dict[str, str], str, _services.GenqProcess],
    worker: _services.GenqProcess,
    prompts: Sequence[Prompt],
    dtype: str,
    args: argparse.Namespace,
    log_dir: Path,
) -> _genq.RunFigures:
    """Every prompt submitted as a job to the running ``worker``, timed to the last result."""
    _, url, api = stack
    _report.step(f"genq {dtype}: submitting {len(prompts)} jobs")
    bodies = [
        {"prompt": p.text, "max_new_tokens": p.max_new_tokens, "do_sample": False} for p in prompts
    ]
    if args.submit == "bulk":
        start, ids, retried = _genq.submit_bulk(url, bodies, args.bulk_size)
    else:
        start, ids, retried = _genq.submit_all(url, bodies, args.concurrency)
    if retried:
        _report.step(f"[yellow]genq {dtype}: {retried} submits got 503 and were retried")
    with httpx.Client(base_url=url, timeout=60) as client:
        _genq.wait_all_final(client, args.timeout, worker, api)
        jobs = _genq.fetch_all(client)
    mine = [jobs[i] for i in ids]
    run = _genq.figures(start, mine)
    if run.failed:
        errors = {j["error"]["message"][:200] for j in mine if j.get("error")}
        _report.step(
            f"[red]genq {dtype}: {run.failed} of {run.jobs} jobs did not succeed[/red] "
            f"(see {_worker_log(log_dir, dtype)}): {'; '.join(sorted(errors)[:3])}"
        )
    _report.step(f"genq {dtype}: {run.tokens_per_s:.1f} tokens/s over {run.seconds:.1f} s")
    ours = sum(len(p.ids) for p in prompts)
    stated = sum(j["usage"]["prompt_tokens"] or 0 for j in mine)
    if not run.failed and stated != ours:
        _report.step(f"note: genq counted {stated} prompt tokens, the bench {ours}")
    return run


def measure_transformers(
    model_dir: Path, prompts: Sequence[Prompt], dtype: str, sizes: Sequence[int], seed_jobs: int
) -> dict[str, _hf.Measured]:
    """seed_loop (when ``seed_jobs``) and static_batch at each size, in ``dtype``, on a
    thread of their own with ``THREADS`` torch threads (:mod:`bench._threads`)."""
    return _threads.on_own_thread(
        lambda: _measure_transformers(model_dir, prompts, dtype, sizes, seed_jobs), THREADS
    )


def _measure_transformers(
    model_dir: Path, prompts: Sequence[Prompt], dtype: str, sizes: Sequence[int], seed_jobs: int
) -> dict[str, _hf.Measured]:
    model, tokenizer = _hf.load(model_dir, dtype)
    eos = tokenizer.eos_token_id
    _hf.warm_up(model, prompts, eos)
    out: dict[str, _hf.Measured] = {}
    if seed_jobs:
        _report.step(f"seed_loop {dtype}: {seed_jobs} prompts, one at a time")
        out["seed_loop"] = _hf.seed_loop(model, prompts[:seed_jobs], eos)
        _report.step(f"seed_loop {dtype}: {out['seed_loop'].tokens_per_s:.1f} tokens/s")
    for size in sizes:
        _report.step(f"static_batch {dtype}: batch size {size}")
        measured = out[f"static_batch_{size}"] = _hf.static_batch(model, prompts, eos, size)
        _report.step(f"static_batch {dtype} ({size}): {measured.tokens_per_s:.1f} tokens/s")
    del model
    gc.collect()
    return out


def _row(system: str, dtype: str, m: _hf.Measured | _genq.RunFigures) -> dict[str, Any]:
    return {
        "system": system,
        "dtype": dtype,
        "jobs": m.jobs,
        "tokens": m.tokens,
        "seconds": round(m.seconds, 3),
        "tokens_per_s": round(m.tokens_per_s, 2),
    }


def _model_prompts(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, list[Prompt]]:
    """The random-weight model's directory, its tokenizer's kind and the workload's prompts."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    _threads.single_threaded_main()  # each measurement on a thread of its own
    model_dir, tokenizer_kind = build_model_dir(tmp / "gpt2-random", seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return (
        model_dir,
        tokenizer_kind,
        list(workload_prompts(tokenizer, args.workload, args.jobs, args.seed)),
    )


def run_model(args: argparse.Namespace, tmp: Path, log_dir: Path) -> dict[str, Any]:
    """uniform / mixed: seed_loop, static_batch and genq on the same prompts."""
    if args.rounds > 1:
        return run_rounds(args, tmp, log_dir)
    model_dir, tokenizer_kind, prompts = _model_prompts(args, tmp)
    main = "bfloat16" if args.dtype == "bfloat16" else "float32"
    sizes = [int(s) for s in (args.batch_sizes or "16,32,64").split(",")]
    hf = measure_transformers(model_dir, prompts, main, sizes, args.seed_loop_jobs)
    by_size = {s: hf[f"static_batch_{s}"] for s in sizes}
    best = max(sizes, key=lambda s: by_size[s].tokens_per_s)
    hf_bf16 = {}
    if args.dtype == "both":
        hf_bf16 = measure_transformers(model_dir, prompts, "bfloat16", [best], 0)
    with genq_stack(tmp, log_dir, str(model_dir), args.api_workers or 1) as stack:
        genq = measure_genq(stack, prompts, main, args, log_dir)
        genq_bf16 = measure_genq(stack, prompts, "bfloat16", args, log_dir) if hf_bf16 else None
    result = _model_result(args, prompts, tokenizer_kind, main, hf["seed_loop"], by_size, genq)
    if hf_bf16 and genq_bf16:
        sb = hf_bf16[f"static_batch_{best}"]
        result["rows"].append(_row(f"static_batch ({best})", "bfloat16", sb))
        result["rows"].append(_row("genq", "bfloat16", genq_bf16))
        result["bf16"] = {
            "static_batch": round(sb.tokens_per_s, 2),
            "genq": round(genq_bf16.tokens_per_s, 2),
            "static_batch_vs_fp32": round(sb.tokens_per_s / by_size[best].tokens_per_s, 3),
            "genq_vs_fp32": round(genq_bf16.tokens_per_s / genq.tokens_per_s, 3),
        }
    if not args.no_hardware:
        result["hardware"] = hardware_share(args, model_dir, prompts, result)
    return result


def _model_result(
    args: argparse.Namespace,
    prompts: Sequence[Prompt],
    tokenizer_kind: str,
    dtype: str,
    seed: _hf.Measured,
    by_size: dict[int, _hf.Measured],
    genq: _genq.RunFigures,
) -> dict[str, Any]:
    """The figures of one measurement of each system (the JSON of bench/README.md)."""
    best = max(by_size, key=lambda s: by_size[s].tokens_per_s)
    rows = [_row("seed_loop", dtype, seed)]
    rows += [_row(f"static_batch ({s})", dtype, m) for s, m in by_size.items()]
    rows.append(_row("genq", dtype, genq))
    seed_rate, static_rate = seed.tokens_per_s, by_size[best].tokens_per_s
    return {
        "workload": args.workload,
        "jobs": len(prompts),
        "tokens_per_s": {
            "seed_loop": round(seed_rate, 2),
            "static_batch": round(static_rate, 2),
            "genq": round(genq.tokens_per_s, 2),
        },
        "ratios": {
            "genq_vs_seed_loop": round(genq.tokens_per_s / seed_rate, 3),
            "genq_vs_static_batch": round(genq.tokens_per_s / static_rate, 3),
        },
        "static_batch_by_size": {str(s): round(m.tokens_per_s, 2) for s, m in by_size.items()},
        "static_batch_best_size": best,
        "seed_loop_jobs": seed.jobs,
        "dtype": dtype,
        "submit": args.submit,
        "genq_failed_jobs": genq.failed,
        "genq_latency": {
            "queue_wait_ms_p50": round(genq.queue_wait_ms[0], 1),
            "queue_wait_ms_p95": round(genq.queue_wait_ms[1], 1),
            "latency_s_p50": round(genq.latency_s[0], 2),
            "latency_s_p95": round(genq.latency_s[1], 2),
        },
        "prompt_tokens_mean": round(sum(len(p.ids) for p in prompts) / len(prompts), 1),
        "new_tokens_requested": sum(p.max_new_tokens for p in prompts),
        "tokenizer": tokenizer_kind,
        "rows": rows,
    }


def run_rounds(args: argparse.Namespace, tmp: Path, log_dir: Path) -> dict[str, Any]:
    """uniform / mixed with ``--rounds N``: static batching (every size) and genq alternate
    N times, static first in even rounds and genq first in odd ones, on one loaded model
    and one settled worker, so that a drift of the machine's speed reaches both alike.
    The table shows each system's median round (the upper middle one for an even N);
    the ratio is the median of the rounds' own ratios (each round's genq over its best
    static size)."""
    if args.dtype == "both":
        raise SystemExit("--rounds takes one --dtype (float32 or bfloat16), not both")
    model_dir, tokenizer_kind, prompts = _model_prompts(args, tmp)
    sizes = [int(s) for s in (args.batch_sizes or "16,32,64").split(",")]
    model, tokenizer = _hf.load(model_dir, args.dtype)
    eos = tokenizer.eos_token_id
    _threads.on_own_thread(lambda: _hf.warm_up(model, prompts, eos), THREADS)
    _report.step(f"seed_loop {args.dtype}: {args.seed_loop_jobs} prompts, one at a time")
    seed = _threads.on_own_thread(
        lambda: _hf.seed_loop(model, prompts[: args.seed_loop_jobs], eos), THREADS
    )

    def static() -> dict[int, _hf.Measured]:
        by_size: dict[int, _hf.Measured] = {}
        for size in sizes:
            batch = functools.partial(_hf.static_batch, model, prompts, eos, size)
            by_size[size] = _threads.on_own_thread(batch, THREADS)
            rate = by_size[size].tokens_per_s
            _report.step(f"static_batch {args.dtype} ({size}): {rate:.1f} tokens/s")
        return by_size

    statics: list[dict[int, _hf.Measured]] = []
    genqs: list[_genq.RunFigures] = []
    stack_context = genq_stack(tmp, log_dir, str(model_dir), args.api_workers or 1)
    with stack_context as stack, genq_worker(stack, args.dtype, args, log_dir) as worker:
        for round_ in range(args.rounds):
            _report.step(f"round {round_ + 1} of {args.rounds}")
            if round_ % 2:
                genqs.append(timed_genq_run(stack, worker, prompts, args.dtype, args, log_dir))
                statics.append(static())
            else:
                statics.append(static())
                genqs.append(timed_genq_run(stack, worker, prompts, args.dtype, args, log_dir))
    ratios = [
        g.tokens_per_s / max(m.tokens_per_s for m in by_size.values())
        for g, by_size in zip(genqs, statics, strict=True)
    ]
    median_genq = sorted(genqs, key=lambda g: g.tokens_per_s)[len(genqs) // 2]
    median_static = {
        s: sorted((r[s] for r in statics), key=lambda m: m.tokens_per_s)[len(statics) // 2]
        for s in sizes
    }
    result = _model_result(
        args, prompts, tokenizer_kind, args.dtype, seed, median_static, median_genq
    )
    result["ratios"]["genq_vs_static_batch"] = round(statistics.median(ratios), 3)
    result["rounds"] = [
        {
            "static_batch_by_size": {str(s): round(m.tokens_per_s, 2) for s, m in r.items()},
            "genq": round(g.tokens_per_s, 2),
            "genq_vs_static_batch": round(ratio, 3),
        }
        for r, g, ratio in zip(statics, genqs, ratios, strict=True)
    ]
    if not args.no_hardware:
        result["hardware"] = hardware_share(args, model_dir, prompts, result)
    return result


def hardware_share(
    args: argparse.Namespace, model_dir: Path, prompts: Sequence[Prompt], result: dict[str, Any]
) -> dict[str, Any]:
    """The matrix-product ceiling, each system's share of it and the decode-step breakdown,
    for each dtype measured, at genq's running batch size."""
    rates = {result["dtype"]: dict(result["tokens_per_s"])}
    rates[result["dtype"]].pop("seed_loop", None)
    if "bf16" in result:
        rates["bfloat16"] = {k: result["bf16"][k] for k in ("static_batch", "genq")}
    rows = _hardware.running_rows(args.worker_env, len(prompts))
    pack_fp32 = _hardware.packs_fp32(args.worker_env)
    return _hardware.measure(model_dir, prompts, rates, rows, THREADS, pack_fp32)


def run_plumbing(args: argparse.Namespace, tmp: Path, log_dir: Path) -> dict[str, Any]:
    """plumbing: many tiny fake-engine jobs through API, Redis, worker and PostgreSQL."""
    with genq_stack(tmp, log_dir, "fake", args.api_workers or 2) as stack:
        env, url, api = stack
        with start_worker(env, log_dir / "worker-fake.log", url, api, args.timeout) as worker:
            _report.step(f"plumbing: {args.idle_jobs} sequential jobs on the idle system")
            added, server = [], []
            with httpx.Client(base_url=url, timeout=30) as client:
                for i in range(args.idle_jobs):
                    body = {"prompt": f"idle job {i} one two three", "max_new_tokens": 4}
                    rtt, job = _genq.run_one(client, body, args.timeout)
                    generation = _genq.epoch(job["finished_at"]) - _genq.epoch(job["started_at"])
                    added.append((rtt - generation) * 1000)
                    queued = _genq.epoch(job["started_at"]) - _genq.epoch(job["created_at"])
                    server.append(queued * 1000)
            runs = {}
            for mode in ("bulk", "single"):
                bodies = [
                    {"prompt": f"plumbing {mode} job {i} alpha beta gamma", "max_new_tokens": 4}
                    for i in range(args.jobs)
                ]
                if mode == "bulk":
                    _report.step(
                        f"plumbing: {args.jobs} jobs, POST /v1/jobs/bulk of {args.bulk_size}"
                    )
                    start, ids, retried = _genq.submit_bulk(url, bodies, args.bulk_size)
                else:
                    _report.step(
                        f"plumbing: {args.jobs} jobs, one POST /v1/jobs each, "
                        f"{args.concurrency} in flight"
                    )
                    start, ids, retried = _genq.submit_all(url, bodies, args.concurrency)
                submit_s = time.time() - start
                with httpx.Client(base_url=url, timeout=60) as client:
                    _genq.wait_all_final(client, args.timeout, worker, api, every=0.2)
                    jobs = _genq.fetch_all(client)
                runs[mode] = (_genq.figures(start, [jobs[i] for i in ids]), submit_s, retried)
    return {
        "workload": "plumbing",
        "jobs": args.jobs,
        "jobs_per_s": round(runs["bulk"][0].jobs_per_s, 1),
        "added_latency_ms": {
            "p50": round(_genq.percentile(added, 50), 1),
            "p95": round(_genq.percentile(added, 95), 1),
        },
        "idle_jobs": args.idle_jobs,
        "idle_server_ms": {
            "p50": round(_genq.percentile(server, 50), 1),
            "p95": round(_genq.percentile(server, 95), 1),
        },
        "bulk_size": args.bulk_size,
        "by_submit": {mode: _plumbing_run(*run) for mode, run in runs.items()},
        "api_workers": args.api_workers or 2,
    }


def _plumbing_run(run: _genq.RunFigures, submit_s: float, retried: int) -> dict[str, Any]:
    return {
        "jobs_per_s": round(run.jobs_per_s, 1),
        "queue_wait_under_load_ms": {
            "p50": round(run.queue_wait_ms[0], 1),
            "p95": round(run.queue_wait_ms[1], 1),
        },
        "submit_s": round(submit_s, 2),
        "submit_503_retries": retried,
        "failed_jobs": run.failed,
        "seconds": round(run.seconds, 2),
    }


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so every finally block stops processes and drops data.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one workload, print its table and write ``--json``."""
    args = parse_args(argv)
    workload: Workload = args.workload
    args.jobs = args.jobs or DEFAULT_JOBS[workload]
    signal.signal(signal.SIGTERM, _terminate)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="genq-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log_dir = args.log_dir or tmp / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        _report.step(f"logs in {log_dir}")
        if workload == "plumbing":
            result = run_plumbing(args, tmp, log_dir)
        elif workload == "beam":
            from bench import _beam

            result = _beam.run(args, tmp, log_dir, genq_stack, start_worker)
        else:
            result = run_model(args, tmp, log_dir)
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if args.worker_env:
        result["worker_env"] = args.worker_env
    result["cpu_cores"] = os.cpu_count()
    # Other work on the machine skews every figure: record how busy it was.
    result["load_avg_1min"] = {"start": load_before, "end": round(os.getloadavg()[0], 2)}
    if workload == "plumbing":
        _report.print_plumbing(result)
    elif workload == "beam":
        from bench import _beam

        _beam.print_result(result)
    else:
        _report.print_model(result)
        if "hardware" in result:
            _hardware.print_report(result["hardware"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
