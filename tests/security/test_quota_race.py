"""Concurrent requests of one owner never pass its stored quotas together: many
submits (or uploads) race, in real concurrent transactions on PostgreSQL and
SQLite, and at most the quota is accepted, the rest answered 429.

To make the race certain rather than likely, every request, once it has counted
the owner's jobs (or bytes), waits at a barrier for all the others to have
counted too before it goes on to insert. Without the owner's lock they all count
the same zero and all insert. With it, the first holds the lock while it waits;
the others queue behind the lock, the barrier gives up (its timeout), and each
then counts what the ones before it committed.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from core import quotas
from core.settings import Settings
from tests.unit.test_quotas import app_with, key, upload

LIMIT = 3
# The module (core.batches re-exports a function of the same name).
ingest = importlib.import_module("core.batches.ingest")
CALLERS = 8  # within the PostgreSQL pool (10) and the API's thread pool (40)


def counting_together(monkeypatch: pytest.MonkeyPatch, name: str, parties: int) -> None:
    """Make ``quotas.<name>`` (the count a quota check makes) wait, after counting,
    until ``parties`` requests have counted or the barrier gives up."""
    counted = threading.Barrier(parties, timeout=5)
    real: Callable[..., int] = getattr(quotas, name)

    def count(*args: Any, **kwargs: Any) -> int:
        found = real(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            counted.wait()
        return found

    monkeypatch.setattr(quotas, name, count)


def all_at_once(calls: int, call: Callable[[], int]) -> list[int]:
    """The status codes of ``calls`` calls of ``call`` released together."""
    start = threading.Barrier(calls)

    def one() -> int:
        start.wait()
        return call()

    with ThreadPoolExecutor(calls) as pool:
        return list(pool.map(lambda _: one(), range(calls)))


def test_concurrent_submits_never_pass_the_active_jobs_quota(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app_with(settings, quota_active_jobs=LIMIT) as api:
        alice = key(settings, "alice")
        counting_together(monkeypatch, "active_jobs", CALLERS)
        codes = all_at_once(
            CALLERS, lambda: api.post("/v1/jobs", json={"prompt": "a"}, headers=alice).status_code
        )
        assert sorted(codes) == [202] * LIMIT + [429] * (CALLERS - LIMIT), codes
        listed = api.get("/v1/jobs", params={"limit": 100}, headers=alice).json()["data"]
        assert len(listed) == LIMIT


def test_concurrent_uploads_never_pass_the_file_bytes_quota(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app_with(settings, quota_file_bytes=LIMIT * 1000) as api:
        alice = key(settings, "alice")
        counting_together(monkeypatch, "stored_bytes", CALLERS)
        codes = all_at_once(CALLERS, lambda: upload(api, alice, 1000).status_code)
        assert sorted(codes) == [200] * LIMIT + [429] * (CALLERS - LIMIT), codes
        assert len(api.get("/v1/files", headers=alice).json()["data"]) == LIMIT


def test_a_batch_being_validated_counts_against_the_quota(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's row is committed (``validating``) before its jobs are written, a
    chunk at a time, so the owner's lock is gone by then: a second batch checked
    while the first is still being parsed must count the first's lines, or both
    pass a quota that holds one of them."""
    parsing, go = threading.Event(), threading.Event()
    real = ingest.parse_openai_file

    def paused(*args: Any, **kwargs: Any) -> Iterator[Any]:
        if not parsing.is_set():  # the first batch only
            parsing.set()
            go.wait(timeout=15)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(ingest, "parse_openai_file", paused)
    with app_with(settings, quota_active_jobs=LIMIT) as api, ThreadPoolExecutor(1) as pool:
        alice = key(settings, "alice")
        body = b'"body": {"model": "fake", "prompt": "a"}'
        line = b'{"custom_id": "%d", "method": "POST", "url": "/v1/completions", ' + body + b"}"
        content = b"\n".join(line % i for i in range(LIMIT))
        file_id = api.post(
            "/v1/files",
            files={"file": ("f.jsonl", content)},
            data={"purpose": "batch"},
            headers=alice,
        ).json()["id"]
        first = pool.submit(api.post, "/v1/batches", json={"input_file_id": file_id}, headers=alice)
        assert parsing.wait(timeout=15)
        second = api.post("/v1/batches", json={"input_file_id": file_id}, headers=alice)
        go.set()
        assert first.result().status_code == 200, first.result().text
    assert second.status_code == 429, second.text
    assert first.result().json()["status"] == "in_progress"
