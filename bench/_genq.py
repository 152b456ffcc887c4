"""Talking to a running genq over HTTP: submit many jobs at once, wait, read them back.

Times come from two clocks on the same machine: the submit start is this process's
``time.time()``; a job's ``created_at`` / ``started_at`` / ``finished_at`` are the
server's UTC timestamps, stored in PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench import _http
from bench._services import GenqProcess, wait_until

FINAL = ("succeeded", "failed", "cancelled")
Job = dict[str, Any]


def epoch(stamp: str) -> float:
    """Seconds since the epoch of an ISO timestamp (naive ones are UTC)."""
    value = dt.datetime.fromisoformat(stamp)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the nearest ranks."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(int(q), 1), 99) - 1]


def api_ready(base_url: str) -> bool:
    """Whether the API answers /readyz with 200 (database and broker reachable)."""
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def submit_all(
    base_url: str, bodies: Sequence[Job], concurrency: int
) -> tuple[float, list[str], int]:
    """Submit every body with ``concurrency`` requests in flight (keep-alive connections).

    Returns the wall-clock time just before the first request, the job ids in order and
    how many 503 answers were retried.
    """
    start = time.time()
    jobs, retried = _http.post_many(base_url, "/v1/jobs", bodies, connections=concurrency)
    return start, [job["id"] for job in jobs], retried


def submit_bulk(
    base_url: str, bodies: Sequence[Job], per_request: int, concurrency: int = 2
) -> tuple[float, list[str], int]:
    """Submit every body through ``POST /v1/jobs/bulk``, ``per_request`` jobs a request;
    returns what :func:`submit_all` does."""
    chunks = [
        {"jobs": list(bodies[i : i + per_request])} for i in range(0, len(bodies), per_request)
    ]
    start = time.time()
    answers, retried = _http.post_many(base_url, "/v1/jobs/bulk", chunks, connections=concurrency)
    return start, [job["id"] for answer in answers for job in answer["data"]], retried


def get_json(client: httpx.Client, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET ``path``'s JSON, riding out 503s and dropped connections for up to a minute
    (the API answers 503 while PostgreSQL or Redis is briefly unreachable)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            response = client.get(path, params=params)
            if response.status_code != 503:
                response.raise_for_status()
                return response.json()
            problem = f"503 {response.text[:200]}"
        except httpx.TransportError as exc:
            problem = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"GET {path} kept failing: {problem}")
        time.sleep(0.5)


def _count(client: httpx.Client, status: str) -> int:
    """0 when no job has ``status``, else 1 or 2 (more than one)."""
    page = get_json(client, "/v1/jobs", {"status": status, "limit": 1})
    return len(page["data"]) + int(page["has_more"])


def wait_all_final(
    client: httpx.Client, timeout: float, *procs: GenqProcess, every: float = 0.5
) -> None:
    """Wait until no job is queued or running (polled coarsely: end times come from SQL)."""

    def done() -> bool:
        return _count(client, "queued") == 0 and _count(client, "running") == 0

    wait_until(done, timeout, "every job to finish", *procs, every=every)


def fetch_all(client: httpx.Client) -> dict[str, Job]:
    """Every job in the database, by id, read through the list endpoint a page at a time."""
    jobs: dict[str, Job] = {}
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if after:
            params["after"] = after
        page = get_json(client, "/v1/jobs", params)
        jobs.update((j["id"], j) for j in page["data"])
        if not page["has_more"]:
            return jobs
        after = page["next_after"]


def run_one(
    client: httpx.Client, body: Job, timeout: float, poll_s: float = 0.002
) -> tuple[float, Job]:
    """Submit one job and poll it until final; returns the round trip (s) and the job."""
    start = time.perf_counter()
    response = client.post("/v1/jobs", json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    deadline = start + timeout
    while True:
        job: Job = get_json(client, f"/v1/jobs/{job_id}")
        if job["status"] in FINAL:
            return time.perf_counter() - start, job
        if time.perf_counter() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
        time.sleep(poll_s)


@dataclasses.dataclass(frozen=True)
class RunFigures:
    """What a timed batch of jobs did, from their stored rows."""

    jobs: int
    failed: int
    tokens: int
    seconds: float
    queue_wait_ms: tuple[float, float]  # p50, p95 of started_at - created_at
    latency_s: tuple[float, float]  # p50, p95 of finished_at - created_at

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


def figures(start: float, jobs: Sequence[Job]) -> RunFigures:
    """Throughput from ``start`` (first submit) to the last ``finished_at``, and latencies."""
    ok = [j for j in jobs if j["status"] == "succeeded"]
    ended = [j for j in jobs if j.get("finished_at")]
    end = max(epoch(j["finished_at"]) for j in ended) if ended else time.time()
    waits = [
        (epoch(j["started_at"]) - epoch(j["created_at"])) * 1000 for j in ok if j["started_at"]
    ]
    latencies = [epoch(j["finished_at"]) - epoch(j["created_at"]) for j in ok]
    return RunFigures(
        jobs=len(jobs),
        failed=len(jobs) - len(ok),
        tokens=sum(j["usage"]["completion_tokens"] or 0 for j in ok),
        seconds=end - start,
        queue_wait_ms=(percentile(waits, 50), percentile(waits, 95)),
        latency_s=(percentile(latencies, 50), percentile(latencies, 95)),
    )
