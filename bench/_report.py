"""Printing the figures: one table per run, and notes on what each number means."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)

TARGETS = {
    "uniform": "genq ≥ 8x seed_loop and ≥ 0.95x static_batch",
    "mixed": "genq ≥ 1.3x static_batch",
    "plumbing": "≥ 300 jobs/s (bulk submit); added latency p50 ≤ 50 ms",
}


def step(message: str) -> None:
    """A progress line on stderr (runs take minutes)."""
    err.print(f"[dim]·[/dim] {message}", highlight=False)


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def print_model(result: dict[str, Any]) -> None:
    """The uniform/mixed table: each system's tokens, time and rate, and the ratios."""
    table = Table(title=f"genq throughput: {result['workload']}, {result['jobs']} jobs")
    for column in ("system", "dtype", "jobs", "tokens", "seconds", "tokens/s", "genq ÷ this"):
        table.add_column(column, justify="left" if column in ("system", "dtype") else "right")
    genq = result["tokens_per_s"]["genq"]
    for row in result["rows"]:
        ratio = _ratio(genq / row["tokens_per_s"]) if row["system"] != "genq" else ""
        if row["dtype"] != result["dtype"]:
            ratio = ""
        table.add_row(
            row["system"],
            row["dtype"],
            str(row["jobs"]),
            str(row["tokens"]),
            f"{row['seconds']:.1f}",
            f"{row['tokens_per_s']:.1f}",
            ratio,
        )
    console.print(table)
    ratios = result["ratios"]
    console.print(
        f"genq vs seed_loop: [bold]{_ratio(ratios['genq_vs_seed_loop'])}[/bold]   "
        f"genq vs static_batch (best size {result['static_batch_best_size']}): "
        f"[bold]{_ratio(ratios['genq_vs_static_batch'])}[/bold]   "
        f"target: {TARGETS[result['workload']]}"
    )
    if "rounds" in result:
        each = ", ".join(_ratio(r["genq_vs_static_batch"]) for r in result["rounds"])
        console.print(
            f"{len(result['rounds'])} rounds alternated, genq ÷ its round's best static_batch: "
            f"{each}; median [bold]{_ratio(ratios['genq_vs_static_batch'])}[/bold] (the table: "
            "each system's median round)"
        )
    if "bf16" in result:
        b = result["bf16"]
        console.print(
            f"bf16 vs fp32: static_batch {_ratio(b['static_batch_vs_fp32'])}, "
            f"genq {_ratio(b['genq_vs_fp32'])}"
        )
    if result["genq_failed_jobs"]:
        console.print(
            f"[red]genq: {result['genq_failed_jobs']} jobs failed: its figures are not "
            "comparable (see the worker log)[/red]"
        )
    latency = result["genq_latency"]
    console.print(
        f"genq per job: queue wait p50/p95 {latency['queue_wait_ms_p50']:.0f}/"
        f"{latency['queue_wait_ms_p95']:.0f} ms, submit-to-result p50/p95 "
        f"{latency['latency_s_p50']:.1f}/{latency['latency_s_p95']:.1f} s"
    )
    submitted = {
        "each": "one POST /v1/jobs per job",
        "bulk": "jobs sent in POST /v1/jobs/bulk requests",
    }[result.get("submit", "each")]
    console.print(
        "[dim]seed_loop: one model.generate per prompt, greedy (the seed used num_beams=5 with "
        f"max_length; greedy here so every system does the same work), on the first "
        f"{result['seed_loop_jobs']} prompts: tokens/s is a rate. static_batch: "
        "model.generate over consecutive groups, left padded, each group runs to its longest "
        "request; only tokens a request asked for count. genq: HTTP API → Redis → genq worker "
        f"→ PostgreSQL ({submitted}), timed from the first submit to the last stored "
        "finished_at, tokens = "
        "sum of usage.completion_tokens. Same model, prompts and thread count (2) for all."
        "[/dim]"
    )


def print_plumbing(result: dict[str, Any]) -> None:
    """The plumbing table: jobs/s and the latencies genq adds around generation."""
    table = Table(title=f"genq plumbing (GENQ_MODEL=fake): {result['jobs']} jobs")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("what it is")
    runs = result["by_submit"]
    for mode, how in (
        ("bulk", f"POST /v1/jobs/bulk, {result['bulk_size']} jobs a request"),
        ("single", "one POST /v1/jobs per job"),
    ):
        run = runs[mode]
        table.add_row(
            f"jobs/s ({mode})",
            f"{run['jobs_per_s']:.1f}",
            f"{how}: jobs ÷ (last stored finished_at - first submit); "
            f"every 202 after {run['submit_s']:.2f} s",
        )
    added = result["added_latency_ms"]
    table.add_row(
        "added latency p50/p95",
        f"{added['p50']:.1f} / {added['p95']:.1f} ms",
        f"idle system, {result['idle_jobs']} sequential jobs: submit → poll sees it done "
        "(2 ms polls), minus its generation time (finished_at - started_at)",
    )
    idle = result["idle_server_ms"]
    table.add_row(
        "idle server-side p50/p95",
        f"{idle['p50']:.1f} / {idle['p95']:.1f} ms",
        "same idle jobs: started_at - created_at (queue + claim), from the rows",
    )
    for mode in ("bulk", "single"):
        load = runs[mode]["queue_wait_under_load_ms"]
        table.add_row(
            f"under load p50/p95 ({mode})",
            f"{load['p50']:.0f} / {load['p95']:.0f} ms",
            "started_at - created_at (mostly time queued behind others)",
        )
    console.print(table)
    console.print(f"target: {TARGETS['plumbing']}")
