"""Batch ingest in process: lines per second, a profile, and memory against N.

    python -m bench.ingest_speed --lines 100000 --db both          # lines/s, SQLite and PG
    python -m bench.ingest_speed --lines 100000 --db sqlite --profile
    python -m bench.ingest_speed --memory 10000,1000000            # peak RSS per N and db
    python -m bench.ingest_speed --lines 20000 --no-db             # CPU a line, no database

Each run uploads an N-line file of typical OpenAI batch lines (the chat request of
OpenAI's batch guide, ``model`` ``fake``, a custom_id and ~30 words each) into a fresh
database (a SQLite file, or a PostgreSQL database made and dropped here), then times
``core.batches.create_batch`` on it: what ``POST /v1/batches`` does before answering.
``--memory`` runs each N (on each ``--db``) in a fresh process and prints the create's
peak RSS over the RSS just before it (the upload is done by then, and the peak is reset
after it). ``--no-db`` times only the API's own work a line (parse and validate, the job
row, its ``COPY`` values) in process, twice (the first warms up): run under ``valgrind
--tool=callgrind`` at two N, the difference of the instruction counts over the lines
between them is the instructions a line, the same on every run (bench/README.md). It
prints figures and the CPU flags; it asserts nothing. No broker: the jobs are left unsent.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import migrations
from bench import _services
from bench._cpu import cpu_flags
from core import batches, files
from core.db import get_sessionmaker
from core.models import LOCAL_OWNER

POSTGRES_ADMIN_URL = os.environ.get(
    "GENQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards judge".split()  # noqa: SIM905


def write_input(path: Path, lines: int) -> None:
    """``lines`` typical batch lines (chat, as in OpenAI's batch guide), written as made."""
    with path.open("w") as out:
        for i in range(lines):
            words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(30))
            body = {
                "model": "fake",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Request {i}: {words}"},
                ],
                "max_tokens": 64,
            }
            line = {"custom_id": f"request-{i}", "method": "POST",
                    "url": "/v1/chat/completions", "body": body}  # fmt: skip
            out.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh migrated database's URL (PostgreSQL: dropped on the way out)."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'genq.db'}"
        migrations.upgrade(url)
        yield url
        return
    with _services.postgres_database(POSTGRES_ADMIN_URL) as url:
        try:
            yield url
        finally:
            from core.db import get_engine

            get_engine(url).dispose()


def upload(url: str, path: Path, lines: int) -> str:
    with get_sessionmaker(url)() as session, path.open("rb") as stream:
        stored = files.store_upload(
            session, stream, owner=LOCAL_OWNER, filename=path.name, purpose="batch",
            max_bytes=1 << 40, max_lines=lines,
        )  # fmt: skip
        session.commit()
        return stored.file.id


def create(url: str, file_id: str, lines: int) -> batches.IngestResult | object:
    with get_sessionmaker(url)() as session:
        batch = batches.create_batch(
            session, owner=LOCAL_OWNER, input_file_id=file_id, endpoint="/v1/chat/completions",
            models=["fake"], max_lines=lines,
        )  # fmt: skip
        assert batch.status == "in_progress", (batch.status, batch.errors)
        assert batch.total == lines
        return batch


def status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB."""
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith(f"{field}:"):
            return int(row.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux >= 4.0), so the upload's own
    peak does not count; where that is not allowed the peak is the process's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def speed(kind: str, lines: int, profile: bool) -> tuple[float, float]:
    """Lines per second of wall time, and per second of this process's CPU time
    (on a loaded machine the second says more; PostgreSQL's own CPU is not in it)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "batch.jsonl"
        write_input(path, lines)
        with database(kind, tmp) as url:
            file_id = upload(url, path, lines)
            profiler = cProfile.Profile() if profile else None
            start, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            create(url, file_id, lines)
            if profiler:
                profiler.disable()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            if profiler:
                stats = pstats.Stats(profiler).sort_stats("tottime")
                stats.print_stats(25)
                stats.sort_stats("cumulative").print_stats(40)
    return lines / elapsed, lines / cpu


def line_path(lines: int) -> float:
    """Seconds of CPU a line of the create's own work, without a database: each line
    parsed and validated, made a job row and converted to its ``COPY`` values."""
    from core import submit
    from core.batches import staging
    from core.batches.ingest import parse_openai_file
    from core.openai_format import OPENAI_DEFAULT_MAX_TOKENS, ParsedRequest

    with tempfile.TemporaryDirectory() as tmp_name:
        path = Path(tmp_name) / "batch.jsonl"
        write_input(path, lines)
        raw = path.read_bytes().splitlines()

    def run() -> float:
        prefix, cpu = submit.sequence_prefix(), time.process_time()
        numbered = enumerate(raw, start=1)
        parsed = parse_openai_file(numbered, endpoint="/v1/chat/completions", models=["fake"])
        for position, (_, request) in enumerate(parsed):
            assert isinstance(request, ParsedRequest), request
            row = submit.job_row(
                submit.NewJob.from_request(request), job_id=submit.sequence_id(prefix, position),
                owner=LOCAL_OWNER, default_max_new_tokens=OPENAI_DEFAULT_MAX_TOKENS,
            )  # fmt: skip
            staging.copy_values(row)
        return (time.process_time() - cpu) / lines

    run()
    return run()


def memory_child(kind: str, lines: int) -> None:
    """In a fresh process: peak RSS of one create over the RSS before it (MiB)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "batch.jsonl"
        write_input(path, lines)
        with database(kind, tmp) as url:
            file_id = upload(url, path, lines)
            path.unlink()
            reset_peak_rss()
            before = status_mib("VmRSS")
            start = time.perf_counter()
            create(url, file_id, lines)
            elapsed = time.perf_counter() - start
            peak = status_mib("VmHWM")
    print(json.dumps({"lines": lines, "before_mib": before, "peak_mib": peak,
                      "lines_per_s": lines / elapsed}))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_speed", description=__doc__)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the create")
    parser.add_argument("--memory", help="N,N,...: peak RSS of a create per N (each --db)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-db", action="store_true", help="CPU a line of the parse, row and COPY values only"
    )
    args = parser.parse_args(argv)
    kinds = ("sqlite", "postgres") if args.db == "both" else (args.db,)
    if args.memory_child:
        memory_child(kinds[0], args.memory_child)
        return
    print(f"cpu flags: {cpu_flags()}; load average: {os.getloadavg()}")
    if args.no_db:
        print(f"{args.lines:,} lines: {line_path(args.lines) * 1e6:.1f} us of CPU a line, no db")
        return
    if args.memory:
        for kind, n in ((k, int(x)) for k in kinds for x in args.memory.split(",")):
            out = subprocess.run(
                [sys.executable, "-m", "bench.ingest_speed", "--db", kind,
                 "--memory-child", str(n)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{kind:>8} {n:>9,} lines: RSS before {r['before_mib']:.1f} MiB, peak "
                  f"{r['peak_mib']:.1f} MiB (+{r['peak_mib'] - r['before_mib']:.1f} MiB), "
                  f"{r['lines_per_s']:,.0f} lines/s")  # fmt: skip
        return
    for kind in kinds:
        rate, cpu_rate = speed(kind, args.lines, args.profile)
        print(f"{kind:>8}: {args.lines:,} lines, {rate:,.0f} lines/s "
              f"({cpu_rate:,.0f} per CPU-second of this process)")  # fmt: skip


if __name__ == "__main__":
    main()
