"""Batch ingest in chunks (core.batches.ingest, core.batches.staging): a large ingest
never holds the database, nothing of a validating batch is sent, an ingest that
stops is cleaned up (by itself, or by the sweeper when its process died), and
duplicate custom_ids are found in bounded memory."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from core import batches, delivery, feed, submit
from core.batches import custom_ids, staging
from core.batches.custom_ids import SeenIds
from core.batches.run_input import find_run
from core.db import get_sessionmaker
from core.models import Batch, Job, utcnow
from core.openai_format import ParsedRequest
from core.schemas import GenerationParams, JobCreate
from core.settings import Settings
from tests.conftest import RecordingQueue
from worker.sweeper import Sweeper

CHUNK = staging.CHUNK_ROWS


class Gate:
    """``genq run``-style parsed requests that stop after ``pause_at`` of them until
    released (or ``wait_s`` passed), or raise there when ``fail`` is set."""

    def __init__(self, lines: int, pause_at: int, *, wait_s: float = 30.0) -> None:
        self.lines, self.pause_at, self.wait_s = lines, pause_at, wait_s
        self.paused = threading.Event()
        self.release = threading.Event()
        self.fail = False

    def __iter__(self) -> Iterator[tuple[int, ParsedRequest]]:
        params = GenerationParams(max_new_tokens=2)
        for i in range(self.lines):
            if i == self.pause_at:
                self.paused.set()
                self.release.wait(self.wait_s)
                if self.fail:
                    raise RuntimeError("the input went away")
            yield i + 1, ParsedRequest(f"r{i}", f"line {i}", "fake", params)


def settings_for(url: str, tmp_path: Path, **values: Any) -> Settings:
    return Settings(data_dir=tmp_path, database_url=url, model="fake", require_auth=False, **values)


def create(url: str, parsed: Any, *, lines: int = 100_000) -> Batch:
    with get_sessionmaker(url)() as session:
        return batches.create_batch(
            session,
            owner="bulk",
            input_file_id=None,
            parsed=parsed,
            completion_window=None,
            models=["fake"],
            max_lines=lines,
        )


def start(
    url: str, gate: Gate, order: list[str] | None = None
) -> tuple[threading.Thread, dict[str, Any]]:
    """Run the ingest of ``gate`` in a thread; its outcome lands in the dict, and
    ``"ingest"`` in ``order`` once it returned."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["batch"] = create(url, gate)
        except BaseException as exc:
            outcome["error"] = exc
        if order is not None:
            order.append("ingest")

    thread = threading.Thread(target=run)
    thread.start()
    assert gate.paused.wait(30)
    return thread, outcome


def state(url: str) -> tuple[str, int, list[dict[str, Any]] | None]:
    """The (only) batch's status, its job rows, and its errors."""
    with get_sessionmaker(url)() as session:
        batch = session.scalars(select(Batch)).one()
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch.id))
        return batch.status, jobs or 0, batch.errors


def test_another_owners_submit_commits_while_a_large_ingest_runs_on_sqlite(
    sqlite_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_url, tmp_path)
    gate = Gate(5 * CHUNK, pause_at=3 * CHUNK + 10, wait_s=5)
    order: list[str] = []
    thread, outcome = start(sqlite_url, gate, order)
    # The ingest is between two chunks: SQLite's one write lock is free. (Held by
    # the ingest, this submit would wait for it: the gate opens after 5 s anyway.)
    with get_sessionmaker(sqlite_url)() as session:
        job, _ = submit.submit_job(
            session, RecordingQueue(), JobCreate(prompt="hi"), settings=settings, owner="web"
        )
    order.append("submit")
    gate.release.set()
    thread.join(60)
    assert "error" not in outcome
    assert outcome["batch"].status == "in_progress"
    assert order == ["submit", "ingest"]
    with get_sessionmaker(sqlite_url)() as session:
        assert session.get_one(Job, job.id).created_at < outcome["batch"].in_progress_at
        assert session.scalar(select(func.count()).select_from(Job)) == 5 * CHUNK + 1


def test_nothing_of_a_validating_batch_is_sent_or_counted(
    database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, tmp_path)
    gate = Gate(3 * CHUNK, pause_at=2 * CHUNK + 5)
    thread, outcome = start(database_url, gate)
    factory = get_sessionmaker(database_url)
    try:
        status, rows, _ = state(database_url)
        assert (status, rows) == ("validating", 2 * CHUNK)  # two chunks committed
        queue = RecordingQueue()
        assert feed.feed_once(factory, queue, settings) == {}
        assert queue.sent == []
        with factory() as session:
            assert delivery.queued_counts(session) == {}
            assert (
                delivery.stale_queued(
                    session, model="fake", priority="low", older_than_s=0, limit=10
                )
                == []
            )
            batch = session.scalars(select(Batch)).one()
            assert batches.counts(session, batch.id).total == 0
            assert not batches.finalize(session, batch)
    finally:
        gate.release.set()
        thread.join(60)
    assert outcome["batch"].status == "in_progress"
    assert outcome["batch"].total == 3 * CHUNK
    queue = RecordingQueue()
    feed.feed_once(factory, queue, settings)
    assert queue.sent  # accepted: the feeder sends it now


def test_a_stalled_ingest_is_taken_over_and_failed_by_the_sweeper(
    database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, tmp_path, ingest_stale_s=0.001)
    gate = Gate(4 * CHUNK, pause_at=2 * CHUNK + 5)
    thread, outcome = start(database_url, gate)
    report = Sweeper(settings, RecordingQueue(), holder="t").sweep_once()
    gate.release.set()  # the stalled creator wakes up: its next chunk is refused
    thread.join(60)
    assert report["ingests_failed"] == 1
    assert isinstance(outcome.get("error"), batches.IngestAbandonedError)
    status, rows, errors = state(database_url)
    assert (status, rows) == ("failed", 0)
    assert errors is not None and errors[0]["code"] == "ingest_interrupted"


def test_a_dead_ingest_is_failed_by_the_sweeper_and_a_live_one_is_not(
    database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, tmp_path)  # the default staleness, 120 s
    factory = get_sessionmaker(database_url)
    params = GenerationParams(max_new_tokens=2)
    ids: dict[str, str] = {}
    for name, age_s in (("dead", 3600), ("live", 0)):
        # What a creator leaves when its process dies after two chunks.
        with factory() as session:
            batch = Batch(
                id=batches.new_batch_id(),
                owner="o",
                status="validating",
                endpoint="/v1/completions",
                completion_window="24h",
                ingest_heartbeat_at=utcnow(),
            )
            session.add(batch)
            session.commit()
            sequence = submit.id_sequence()
            request = submit.NewJob("p", "fake", params, priority="low")
            for _ in range(2):
                rows = [
                    submit.job_row(
                        request,
                        job_id=next(sequence),
                        owner="o",
                        default_max_new_tokens=2,
                        batch_id=batch.id,
                    )
                    for _ in range(CHUNK + 1)
                ]
                staging.write_chunk(session, batch.id, rows)
            stamp = utcnow() - dt.timedelta(seconds=age_s)
            session.execute(
                update(Batch).where(Batch.id == batch.id).values(ingest_heartbeat_at=stamp)
            )
            session.commit()
            ids[name] = batch.id
    report = Sweeper(settings, RecordingQueue(), holder="t").sweep_once()
    assert report["ingests_failed"] == 1
    with factory() as session:
        dead, live = session.get_one(Batch, ids["dead"]), session.get_one(Batch, ids["live"])
        assert dead.status == "failed" and dead.errors is not None
        assert dead.errors[0]["code"] == "ingest_interrupted"
        assert live.status == "validating"
        count = select(func.count()).select_from(Job)
        assert session.scalar(count.where(Job.batch_id == dead.id)) == 0
        assert session.scalar(count.where(Job.batch_id == live.id)) == 2 * (CHUNK + 1)


def test_an_ingest_interrupted_by_an_error_deletes_its_rows(
    database_url: str, tmp_path: Path
) -> None:
    gate = Gate(4 * CHUNK, pause_at=2 * CHUNK + 5)
    gate.fail = True
    thread, outcome = start(database_url, gate)
    gate.release.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), RuntimeError)
    status, rows, errors = state(database_url)
    assert (status, rows) == ("failed", 0)
    assert errors is not None and errors[0]["code"] == "ingest_interrupted"


def requests(custom: list[str]) -> Iterator[tuple[int, ParsedRequest]]:
    params = GenerationParams(max_new_tokens=2)
    for number, custom_id in enumerate(custom, start=1):
        yield number, ParsedRequest(custom_id, "p", "fake", params)


def test_a_duplicate_custom_id_chunks_apart_fails_the_batch_naming_its_line(
    database_url: str,
) -> None:
    ids = [f"r{i}" for i in range(2 * CHUNK + 500)]
    ids.append("r7")  # its first use is in a chunk committed long before
    batch = create(database_url, requests(ids))
    assert batch.status == "failed"
    assert batch.errors == [
        {
            "code": "duplicate_custom_id",
            "message": "custom_id 'r7' is used by an earlier line",
            "param": "custom_id",
            "line": len(ids),
        }
    ]
    assert state(database_url)[1] == 0  # the chunks written were deleted


def test_a_hash_collision_is_confirmed_against_the_stored_id(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "r5" and "r5-twin" get one hash; r5's row is in a committed chunk.
    real = custom_ids._hash
    monkeypatch.setattr(custom_ids, "_hash", lambda s: real(s.removesuffix("-twin")))
    ids = [f"r{i}" for i in range(CHUNK + 100)] + ["r5-twin"]
    batch = create(database_url, requests(ids))
    assert batch.status == "in_progress", batch.errors
    assert batch.total == len(ids)
    again = create(database_url, requests([*ids, "r5-twin"]))  # now truly used twice
    assert again.status == "failed"
    assert again.errors is not None
    assert [(e["code"], e["line"]) for e in again.errors] == [("duplicate_custom_id", len(ids) + 1)]


def test_seen_ids_keep_about_16_bytes_a_line() -> None:
    seen = SeenIds()
    lines = 200_000
    for i in range(lines):
        assert seen.add(f"request-{i}", lambda *_: True) is None
    assert seen.add("request-123", lambda *_: True) == 123
    assert len(seen) == lines
    assert seen.nbytes() <= 25 * lines  # a set of the strings: ~100 bytes a line


def test_seen_ids_tell_colliding_ids_apart_by_the_callback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(custom_ids, "_hash", lambda s: 42)  # every id collides
    stored: list[str] = []
    seen = SeenIds()

    def add(custom_id: str) -> int | None:
        found = seen.add(custom_id, lambda p, c: stored[p] == c)
        if found is None:
            stored.append(custom_id)
        return found

    assert [add(c) for c in ("a", "b", "c")] == [None, None, None]
    assert add("b") == 1
    assert add("c") == 2
    assert add("d") is None


def test_genq_run_does_not_resume_a_batch_whose_ingest_died(sqlite_url: str) -> None:
    with get_sessionmaker(sqlite_url)() as session:
        session.add(
            Batch(
                id=batches.new_batch_id(),
                owner="local",
                status="validating",
                endpoint="/v1/completions",
                completion_window="none",
                run_key="k",
                ingest_heartbeat_at=utcnow(),
            )
        )
        session.commit()
        assert find_run(session, "k", "local") is None


# The rows of a chunk stream to PostgreSQL while the chunk is built (core.batches.writer):
# a chunk is still whole or nothing, and nothing is left open when an ingest stops.


def server_sessions(url: str) -> tuple[list[str], int]:
    """The states of the database's other sessions, and the rows that a ``COPY``
    under way has sent so far (0: none under way)."""
    with get_sessionmaker(url)() as session:
        states = session.scalars(
            text(
                "SELECT state FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).all()
        copied = session.scalar(
            text(
                "SELECT coalesce(sum(tuples_processed), 0) FROM pg_stat_progress_copy "
                "WHERE datname = current_database()"
            )
        )
        return [str(s) for s in states], int(copied or 0)


def test_on_postgres_a_chunks_rows_reach_the_server_while_it_is_built(postgres_url: str) -> None:
    gate = Gate(3 * CHUNK, pause_at=2 * CHUNK + CHUNK // 2)
    thread, outcome = start(postgres_url, gate)
    try:
        assert state(postgres_url)[:2] == ("validating", 2 * CHUNK)  # uncommitted: unseen
        deadline = time.monotonic() + 30
        while server_sessions(postgres_url)[1] == 0:  # the server reads them meanwhile
            assert time.monotonic() < deadline, "no row of the open chunk reached the server"
            time.sleep(0.05)
    finally:
        gate.release.set()
        thread.join(60)
    assert outcome["batch"].status == "in_progress"
    assert state(postgres_url)[1] == 3 * CHUNK


def test_a_database_error_in_a_chunk_fails_the_create_with_nothing_left(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The row at this position repeats the previous row's id: the database refuses
    # the chunk (on PostgreSQL while its COPY streams, on SQLite at its insert).
    bad = 2 * CHUNK + 10
    real = submit.sequence_id
    monkeypatch.setattr(
        submit, "sequence_id", lambda p, i: real(p, i - 1 if i == bad else i), raising=True
    )
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        create(database_url, requests([f"r{i}" for i in range(4 * CHUNK)]))
    status, rows, errors = state(database_url)
    assert (status, rows) == ("failed", 0)
    assert errors is not None and errors[0]["code"] == "ingest_interrupted"
    if database_url.startswith("postgresql"):
        states, copying = server_sessions(database_url)
        assert copying == 0
        assert not [s for s in states if "transaction" in s]  # no chunk left open
    monkeypatch.undo()
    again = create(database_url, requests([f"r{i}" for i in range(2 * CHUNK + 20)]))
    assert again.status == "in_progress"  # the pool's connections are fine
    assert again.total == 2 * CHUNK + 20


def test_an_input_error_mid_chunk_leaves_no_chunk_open(postgres_url: str) -> None:
    gate = Gate(4 * CHUNK, pause_at=2 * CHUNK + CHUNK // 2)
    gate.fail = True
    thread, outcome = start(postgres_url, gate)
    gate.release.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), RuntimeError)
    assert state(postgres_url)[:2] == ("failed", 0)
    states, copying = server_sessions(postgres_url)
    assert copying == 0
    assert not [s for s in states if "transaction" in s]


def test_an_invalid_line_drops_the_open_chunk_at_once(database_url: str) -> None:
    """Once the batch is known to fail, no chunk stays open while the rest of the
    file is validated (on PostgreSQL a COPY transaction would be left idle)."""
    paused, release = threading.Event(), threading.Event()
    params = GenerationParams(max_new_tokens=2)
    invalid = 2 * CHUNK + 300

    def lines() -> Iterator[batches.Parsed]:
        for i in range(4 * CHUNK):
            if i == invalid:
                yield i + 1, batches.LineError(i + 1, "invalid_request", "bad line")
            elif i == invalid + 10:
                paused.set()
                release.wait(30)
            yield i + 1, ParsedRequest(f"r{i}", f"line {i}", "fake", params)

    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(batch=create(database_url, lines())))
    thread.start()
    try:
        assert paused.wait(30)
        assert state(database_url)[:2] == ("validating", 2 * CHUNK)
        if database_url.startswith("postgresql"):
            states, copying = server_sessions(database_url)
            assert copying == 0
            assert not [s for s in states if "transaction" in s]
    finally:
        release.set()
        thread.join(60)
    batch = outcome["batch"]
    assert batch.status == "failed"
    assert [(e["code"], e["line"]) for e in batch.errors] == [("invalid_request", invalid + 1)]
    assert state(database_url)[1] == 0


@pytest.mark.parametrize(
    ("first", "again"),
    [
        (CHUNK - 1, CHUNK),  # the last row of a committed chunk, again first in the next
        (CHUNK, CHUNK + 1),  # both in the open chunk
        (CHUNK + 5, 3 * CHUNK),  # the first chunk apart, repeated in the last (partial) one
    ],
)
def test_a_duplicate_next_to_a_chunk_boundary_is_found(
    database_url: str, first: int, again: int
) -> None:
    ids = [f"r{i}" for i in range(3 * CHUNK + 50)]
    ids[again] = ids[first]
    batch = create(database_url, requests(ids))
    assert batch.status == "failed"
    assert batch.errors is not None
    assert [(e["code"], e["line"]) for e in batch.errors] == [("duplicate_custom_id", again + 1)]
    assert state(database_url)[1] == 0


def test_a_hash_collision_in_the_open_chunk_is_told_apart(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "r{CHUNK + 3}" and its twin get one hash; both are in the open chunk.
    real = custom_ids._hash
    monkeypatch.setattr(custom_ids, "_hash", lambda s: real(s.removesuffix("-twin")))
    ids = [f"r{i}" for i in range(CHUNK + 10)] + [f"r{CHUNK + 3}-twin"]
    batch = create(database_url, requests(ids))
    assert batch.status == "in_progress", batch.errors
    assert state(database_url)[1] == len(ids)


def test_on_postgres_an_ingest_reading_its_input_on_the_callers_session_needs_one_connection(
    postgres_url: str,
) -> None:
    """The input file is read on the caller's session (files.iter_chunks), which so
    holds a pooled connection throughout; the streamed chunk's COPY takes a second
    one from the same pool meanwhile (hold and wait). With as many concurrent file
    ingests as the pool has connections (30: core.db), each holds one and waits for
    another until pool_timeout, and all fail. One connection per ingest sufficed
    before the rows were streamed."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=2)
    try:
        with Session(engine, expire_on_commit=False) as session:

            def parsed() -> Iterator[tuple[int, ParsedRequest]]:
                for number, item in requests([f"r{i}" for i in range(CHUNK + 5)]):
                    session.scalar(select(1))  # as iter_chunks reads the next chunk
                    yield number, item

            batch = batches.create_batch(
                session,
                owner="bulk",
                input_file_id=None,
                parsed=parsed(),
                completion_window=None,
                models=["fake"],
                max_lines=100_000,
            )
        assert batch.status == "in_progress"
    finally:
        engine.dispose()


def test_each_job_row_stores_its_own_parameters() -> None:
    """Rows of one parameters object get its values dumped once, each row a dict of its
    own; no other object's rows ever get them (not a fresh object that may reuse a
    freed one's id, not the same one with another default length); the objects kept
    are bounded, and none with a response format (a schema may be large) is kept."""
    import gc
    import weakref

    prefix = submit.sequence_prefix()

    def row(params: GenerationParams, default: int = 50) -> dict[str, Any]:
        new = submit.NewJob(prompt="p", model="m", params=params)
        made = submit.job_row(
            new, job_id=submit.sequence_id(prefix, 0), owner="o", default_max_new_tokens=default
        )
        stored: dict[str, Any] = made["params"]
        return stored

    shared = GenerationParams(temperature=0.5, do_sample=True)
    first, second = row(shared), row(shared)
    assert first == second and first["max_new_tokens"] == 50 and first["temperature"] == 0.5
    first["stop"].append("leak")
    first["top_k"] = 1
    assert row(shared) == second and second["stop"] == [] and second["top_k"] == 50
    assert row(shared, 7)["max_new_tokens"] == 7
    kept = []
    for seed in range(600):  # each object freed before the next is made (its id reused)
        params = GenerationParams(seed=seed)
        kept.append(weakref.ref(params))
        assert row(params)["seed"] == seed
        del params
    schema = GenerationParams(response_format={"type": "json_object"}, stop=["x"])
    assert row(schema)["response_format"] == {"type": "json_object"}
    assert row(schema)["stop"] == ["x"]
    schema_ref = weakref.ref(schema)
    del schema
    gc.collect()
    assert sum(ref() is not None for ref in kept) <= 256
    assert schema_ref() is None


def test_drawn_seeds_differ_in_a_forked_process() -> None:
    """Jobs without a seed get one drawn; a forked process (a prefork worker, a
    forking server) draws its own sequence, not a copy of its parent's."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        child = pool.apply(_draws)
    parent = _draws()
    assert len(set(parent)) == len(parent) and child != parent


def _draws() -> list[int]:
    return [submit.draw_seed() for _ in range(8)]
