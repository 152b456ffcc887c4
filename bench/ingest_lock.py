"""How long another owner's ``POST /v1/jobs`` waits while a large batch is created
on SQLite (one writer at a time): the ingest commits a chunk of job rows per
transaction (core/batches/staging.py), so a submit waits for one chunk at most.

    python -m bench.ingest_lock --lines 50000

Prints the batch's creation time, the submits' latencies (median, max) and the
CPU flags. In process (TestClient), no broker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

import migrations
from api.app import create_app
from bench._cpu import cpu_flags
from core.queue import Route
from core.settings import Settings


class NullQueue:
    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        pass

    def enqueue_many(self, routes: Iterable[Route]) -> None:
        pass

    def ping(self) -> None:
        pass

    def depth(self, queue: str) -> int:
        return 0

    def queued_jobs(self, queue: str) -> int:
        return 0


def batch_file(lines: int) -> bytes:
    out = []
    for i in range(lines):
        body = {"model": "fake", "prompt": f"request {i} " + "word " * 20, "max_tokens": 8}
        out.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                               "url": "/v1/completions", "body": body}))  # fmt: skip
    return ("\n".join(out) + "\n").encode()


def run(lines: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'genq.db'}"
        migrations.upgrade(url)
        settings = Settings(data_dir=Path(tmp), database_url=url, model="fake",
                            require_auth=False, max_batch_lines=lines)  # fmt: skip
        with TestClient(create_app(settings, queue=NullQueue())) as client:
            content = batch_file(lines)
            file_id = client.post("/v1/files", files={"file": ("b.jsonl", content)},
                                  data={"purpose": "batch"}).json()["id"]  # fmt: skip
            latencies: list[float] = []
            done = threading.Event()
            took: list[float] = []

            def create() -> None:
                start = time.perf_counter()
                response = client.post("/v1/batches", json={"input_file_id": file_id})
                took.append(time.perf_counter() - start)
                assert response.json()["status"] == "in_progress", response.text
                done.set()

            thread = threading.Thread(target=create)
            thread.start()
            time.sleep(0.05)
            while not done.is_set():
                start = time.perf_counter()
                assert client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)
            thread.join()
    return {"batch_s": took[0], "submits": len(latencies),
            "p50_s": statistics.median(latencies), "max_s": max(latencies)}  # fmt: skip


def main(argv: Iterator[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args(list(argv) if argv is not None else None)
    r = run(args.lines)
    print(f"cpu flags: {cpu_flags()}")
    print(f"batch {r['batch_s']:.2f} s; other submits ({r['submits']}): "
          f"p50 {r['p50_s'] * 1000:.0f} ms, max {r['max_s'] * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
