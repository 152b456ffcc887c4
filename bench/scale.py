"""Batches of many lines through genq: what each step costs as N grows.

``python -m bench.scale [--lines 10000,100000] [--million] [--json OUT]``

For each N, on a fresh PostgreSQL database and Redis queue, with one ``genq api`` and
one ``genq worker`` (``GENQ_MODEL=fake``: the deterministic FakeEngine, no torch; or
``--model DIR``, a local model, where a batch of a few thousand lines is enough), it
uploads an N-line batch file with the official openai SDK, creates the batch, polls
it every second until it completes while a web app's single jobs run beside it,
downloads the output (every custom_id must come back once), then runs the same file
through ``genq run`` (``--cli-only``: only that, against a fresh stack). It prints
figures; it asserts nothing. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import _genq, _probe, _report, _services
from bench._cpu import cpu_flags
from bench._workload import REPO
from bench.throughput import genq_stack, start_worker

FINAL = ("completed", "failed", "expired", "cancelled")
MAX_NEW_TOKENS = 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--lines", default="10000,100000", help="batch sizes, comma separated")
    parser.add_argument("--million", action="store_true", help="add a 1,000,000-line batch")
    parser.add_argument("--idle-jobs", type=int, default=20, help="single jobs on the idle system")
    phases = parser.add_mutually_exclusive_group()
    phases.add_argument("--no-cli", action="store_true", help="skip the genq run phase")
    phases.add_argument(
        "--cli-only",
        action="store_true",
        help="only the genq run phase (its time and peak RSS), no batch through the SDK",
    )
    parser.add_argument(
        "--model",
        default="fake",
        help="what the worker serves: fake (the FakeEngine) or a local model directory",
    )
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per batch")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--log-dir", type=Path, help="keep the api/worker logs here")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra GENQ_* settings for every process, e.g. GENQ_REQUEUE_AFTER_S=20",
    )
    return parser.parse_args(argv)


def write_input(path: Path, lines: int, model: str = "fake") -> None:
    """An OpenAI batch file of ``lines`` completion requests for ``model``."""
    with path.open("w") as f:
        for i in range(lines):
            body = {"model": model, "prompt": f"line {i} alpha beta", "max_tokens": 4}
            request = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions"}
            f.write(json.dumps(request | {"body": body}) + "\n")


PHASES = ("queued", "running", "around")
"""Where a single job's round trip went, from its stored times: ``queued`` (created →
claimed), ``running`` (claimed → stored) and ``around`` (the rest: the submit's own
request before the row's commit, and the polls after the store that saw it)."""


def single_job(client: httpx.Client, timeout: float) -> tuple[float, dict[str, float]]:
    """One web app's job (normal priority) from submit to done, in ms (2 ms polls), and
    that time split into :data:`PHASES` (none for a job that ended without running)."""
    body = {"prompt": "a web app's job", "max_new_tokens": MAX_NEW_TOKENS}
    rtt, job = _genq.run_one(client, body, timeout)
    times = [job.get(k) for k in ("created_at", "started_at", "finished_at")]
    if None in times:  # ended without running (failed or cancelled while queued)
        return rtt * 1000, {}
    created, started, finished = (dt.datetime.fromisoformat(str(t)) for t in times)
    queued = (started - created).total_seconds() * 1000
    running = (finished - started).total_seconds() * 1000
    phases = {"queued": queued, "running": running, "around": rtt * 1000 - queued - running}
    return rtt * 1000, phases


class SingleJobs:
    """Single jobs' round trips (ms) and their :data:`PHASES`."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.phases: dict[str, list[float]] = {name: [] for name in PHASES}

    def run(self, client: httpx.Client, timeout: float) -> None:
        latency, phases = single_job(client, timeout)
        self.latencies_ms.append(latency)
        for name, ms in phases.items():
            self.phases[name].append(ms)

    def stats(self) -> dict[str, Any]:
        return _ms_stats(self.latencies_ms) | {
            "phases_p50": {
                name: round(_genq.percentile(ms, 50), 1) for name, ms in self.phases.items()
            }
        }


class Beside:
    """Single jobs, one after another (0.5 s apart), until stopped: latency under load."""

    def __init__(self, url: str, timeout: float) -> None:
        self.jobs = SingleJobs()
        self._url, self._timeout = url, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(base_url=self._url, timeout=60) as client:
            while not self._stop.wait(0.5):
                self.jobs.run(client, self._timeout)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join(timeout=self._timeout)


def _ms_stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(_genq.percentile(values, 50), 1),
        "p95": round(_genq.percentile(values, 95), 1),
        "max": round(max(values), 1) if values else float("nan"),
    }


def poll_batch(
    client: httpx.Client, batch_id: str, timeout: float, *procs: _services.GenqProcess
) -> tuple[dict[str, Any], list[float]]:
    """GET the batch every second (as the SDK's users do) until it is final; returns
    it and each read's latency (ms)."""
    latencies: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        started = time.perf_counter()
        batch: dict[str, Any] = _genq.get_json(client, f"/v1/batches/{batch_id}")
        latencies.append((time.perf_counter() - started) * 1000)
        if batch["status"] in FINAL:
            return batch, latencies
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))
    raise TimeoutError(f"batch {batch_id} not final after {timeout} s")


def download(url: str, file_id: str, lines: int) -> tuple[float, int, int]:
    """Stream the output file; returns seconds, lines, and distinct custom_ids."""
    seen: set[str] = set()
    count = 0
    started = time.perf_counter()
    with (
        httpx.Client(base_url=url, timeout=600) as client,
        client.stream("GET", f"/v1/files/{file_id}/content") as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if line:
                seen.add(json.loads(line)["custom_id"])
                count += 1
    return time.perf_counter() - started, count, len(seen)


def run_cli(env: dict[str, str], input_path: Path, out: Path, log: Path) -> dict[str, Any]:
    """``genq run`` on the same input against the running worker: time and peak RSS."""
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "run", str(input_path), "-o", str(out), "--no-worker"],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    memory = _probe.GroupMemory(proc.pid)
    started = time.perf_counter()
    with _probe.Sampler([memory.sample], every=0.2).running():
        code = proc.wait()
    seconds = time.perf_counter() - started
    written = sum(1 for _ in out.open("rb")) if out.exists() else 0
    return {"seconds": round(seconds, 2), "exit": code, "lines": written, "peak_rss": memory.peak}


def measure(lines: int, args: argparse.Namespace, tmp: Path, log_dir: Path) -> dict[str, Any]:
    """One N: the whole cycle on a fresh stack."""
    from openai import OpenAI

    extra = {"GENQ_MAX_BATCH_LINES": str(max(lines, 50_000))}
    extra |= dict(item.split("=", 1) for item in args.env)
    input_path = tmp / f"batch-{lines}.jsonl"
    logs = log_dir / str(lines)
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        env, url, api = stack.enter_context(genq_stack(tmp, logs, args.model, 1, extra))
        worker = stack.enter_context(start_worker(env, logs / "worker.log", url, api, args.timeout))
        with httpx.Client(base_url=url, timeout=60) as client:
            served = _genq.get_json(client, "/v1/models")["data"][0]["id"]
        write_input(input_path, lines, served)
        if args.cli_only:
            _report.step(f"{lines:,} lines: genq run")
            return {
                "lines": lines,
                "cli": _with_mib(run_cli(env, input_path, tmp / "out.jsonl", logs / "cli.log")),
            }
        db_url, queue = env["GENQ_DATABASE_URL"], env["GENQ_QUEUE"]
        _report.step(f"{lines:,} lines: {args.idle_jobs} single jobs on the idle system")
        with httpx.Client(base_url=url, timeout=60) as client:
            idle = SingleJobs()
            for _ in range(args.idle_jobs):
                idle.run(client, args.timeout)
        api_mem, worker_mem = (
            _probe.GroupMemory(api.proc.pid),
            _probe.GroupMemory(worker.proc.pid),
        )
        api_mem.reset()
        worker_mem.reset()
        redis = _probe.RedisQueues(_services.REDIS_URL, queue)
        sdk = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
        sampler = _probe.Sampler([api_mem.sample, worker_mem.sample, redis.sample])
        beside = Beside(url, args.timeout)
        with sampler.running():
            _report.step(f"{lines:,} lines: upload")
            t0 = time.perf_counter()
            with input_path.open("rb") as f:
                uploaded = sdk.files.create(file=f, purpose="batch")
            upload_s = time.perf_counter() - t0
            cpu0 = worker_mem.cpu()
            t1 = time.perf_counter()
            created = sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
            )
            ingest_s = time.perf_counter() - t1
            created_at = time.time()
            _report.step(f"{lines:,} lines: ingested in {ingest_s:.1f} s; running")
            with beside.running(), httpx.Client(base_url=url, timeout=600) as client:
                batch, reads = poll_batch(client, created.id, args.timeout, api, worker)
            run_s = time.perf_counter() - t1
            worker_cpu = worker_mem.cpu() - cpu0
        send_s = redis.last_rise - created_at if redis.last_rise else float("nan")
        _report.step(f"{lines:,} lines: {batch['status']} after {run_s:.1f} s; download")
        down_s, down_lines, distinct = download(url, batch["output_file_id"], lines)
        time.sleep(11)  # PostgreSQL flushes other backends' table statistics when idle
        table = _probe.table_stats(db_url)
        cli: dict[str, Any] = {}
        if not args.no_cli:
            _report.step(f"{lines:,} lines: genq run")
            cli = run_cli(env, input_path, tmp / f"out-{lines}.jsonl", logs / "cli.log")
    counts = batch["request_counts"]
    return {
        "lines": lines,
        "status": batch["status"],
        "request_counts": counts,
        "upload_s": round(upload_s, 2),
        "ingest_s": round(ingest_s, 2),
        "ingest_lines_per_s": round(lines / ingest_s),
        "send_s": round(send_s, 2),
        "run_s": round(run_s, 2),
        "download_s": round(down_s, 2),
        "download_lines": down_lines,
        "download_distinct_custom_ids": distinct,
        "api_rss_mib": _mib(api_mem.start, api_mem.peak),
        "worker_rss_mib": _mib(worker_mem.start, worker_mem.peak),
        "worker_cpu_ms_per_job": round(worker_cpu * 1000 / lines, 3),
        "redis_peak_messages": redis.peak_messages,
        "redis_peak_bytes": redis.peak_bytes,
        "status_read_ms": _ms_stats(reads),
        "single_job_ms": {"idle": idle.stats(), "under_load": beside.jobs.stats()},
        "db": table | {"bytes_per_job": round(table["total_bytes"] / max(table["live_rows"], 1))},
        "cli": _with_mib(cli) if cli else {},
    }


def _with_mib(cli: dict[str, Any]) -> dict[str, Any]:
    return cli | {"peak_rss_mib": round(cli["peak_rss"] / 2**20, 1)}


def _mib(start: int, peak: int) -> dict[str, float]:
    return {"before": round(start / 2**20, 1), "peak": round(peak / 2**20, 1)}


def print_result(result: dict[str, Any], flags: str) -> None:
    """One block of figures per N, each line with the CPU flags (the machine is noisy)."""
    out = _report.console
    settings = " ".join([f"model={result['model']}", *result["env"]])
    for r in result["runs"]:
        out.print(
            f"[bold]bench.scale: {r['lines']:,} lines[/bold], {settings}  (CPU flags: {flags})",
            soft_wrap=True,
        )
        if "status" not in r:  # --cli-only
            out.print(f"  {'genq run':<40} {_cli(r['cli'])}", highlight=False, soft_wrap=True)
            continue
        idle, load = r["single_job_ms"]["idle"], r["single_job_ms"]["under_load"]
        ratio = load["p50"] / idle["p50"] if idle["p50"] else float("nan")
        db = r["db"]
        rows = [
            ("status", f"{r['status']} {r['request_counts']}"),
            ("upload", f"{r['upload_s']:.2f} s"),
            ("ingest", f"{r['ingest_s']:.2f} s ({r['ingest_lines_per_s']:,} lines/s)"),
            ("send (last rise of the broker's depth)", f"{r['send_s']:.1f} s after create"),
            ("run (create → completed)", f"{r['run_s']:.1f} s"),
            ("download", f"{r['download_s']:.2f} s, {r['download_distinct_custom_ids']:,} ids"),
            ("API RSS before → peak", _rss(r["api_rss_mib"])),
            ("worker RSS before → peak", _rss(r["worker_rss_mib"])),
            ("worker CPU per job", f"{r['worker_cpu_ms_per_job']:.2f} ms"),
            ("genq run", _cli(r["cli"])),
            ("Redis peak", f"{r['redis_peak_messages']:,} messages, {r['redis_peak_bytes']:,} B"),
            ("status read p50/p95/max", _lat(r["status_read_ms"])),
            ("single job idle p50/p95", _lat(idle)),
            ("single job under load p50/p95", f"{_lat(load)} ({ratio:.2f}x idle p50)"),
            ("single job p50 phases, idle", _phases(idle)),
            ("single job p50 phases, under load", _phases(load)),
            ("DB bytes per job", f"{db['bytes_per_job']:,} (total {db['total_bytes']:,})"),
            (
                "job rows live / dead / updates (HOT)",
                f"{db['live_rows']:,} / {db['dead_rows']:,} / "
                f"{db['updates']:,} ({db['hot_updates']:,})",
            ),
            ("deadlocks", str(db["deadlocks"])),
        ]
        for name, value in rows:
            out.print(f"  {name:<40} {value}", highlight=False, soft_wrap=True)


def _rss(m: dict[str, float]) -> str:
    return f"{m['before']:.0f} → {m['peak']:.0f} MiB (+{m['peak'] - m['before']:.0f})"


def _lat(m: dict[str, float]) -> str:
    return f"{m['p50']:.1f} / {m['p95']:.1f} ms (max {m['max']:.1f}, n={m['n']})"


def _phases(m: dict[str, Any]) -> str:
    phases = m.get("phases_p50", {})
    return ", ".join(f"{name} {phases[name]:.1f} ms" for name in PHASES if name in phases)


def _cli(c: dict[str, Any]) -> str:
    if not c:
        return "skipped"
    return f"{c['seconds']:.1f} s, exit {c['exit']}, {c['lines']:,} lines, {c['peak_rss_mib']} MiB"


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind: stop processes, drop the database


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every N, print the figures and write ``--json``."""
    args = parse_args(argv)
    sizes = [int(n) for n in args.lines.split(",") if n]
    if args.million:
        sizes.append(1_000_000)
    signal.signal(signal.SIGTERM, _terminate)
    flags = cpu_flags()
    load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="genq-scale-") as tmp_name:
        tmp = Path(tmp_name)
        log_dir = args.log_dir or tmp / "logs"
        _report.step(f"logs in {log_dir}")
        for lines in sizes:
            runs.append(measure(lines, args, tmp, log_dir))
    result = {
        "runs": runs,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_flags": flags,
        "cpu_cores": os.cpu_count(),
        "load_avg_1min": {"start": load, "end": round(os.getloadavg()[0], 2)},
        "env": args.env,
        "model": args.model,
    }
    print_result(result, flags)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
