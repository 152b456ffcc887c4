"""Per-owner limits, so that one owner cannot crowd out the others.

Each is answered with :class:`QuotaExceededError` (the API's 429 with
``Retry-After``): queued + running jobs (:func:`check_active_jobs`), stored file
bytes (:func:`check_file_bytes`), requests per second (:class:`RateLimiter`) and
open event streams or waiting completions (:class:`StreamSlots`); and per client
address, wrong API keys (:class:`AuthFailures`), so keys cannot be guessed at
speed. The defaults (``GENQ_QUOTA_*``) are generous enough that one user of an
embedded genq never meets them; 0 turns a limit off. The rate and stream limits are kept in each API
process (with N replicas an owner gets N times them): they protect a process's
threads and connections, which is what they are for.

The two stored quotas are a check then an insert, so concurrent requests of one
owner must not both pass the check: :func:`lock_owner` serializes them (a
PostgreSQL advisory lock held until the transaction ends; on SQLite the write
lock of the database, taken before the count).

Priority ``high`` is a permission of a key (``genq keys create --high-priority``),
checked by :func:`check_priority`; without authentication everything is allowed.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    ScalarSelect,
    Select,
    String,
    bindparam,
    case,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from core import tally
from core.errors import CoreError
from core.models import LOOSE_ACTIVE, Batch, File, Job, job_through
from core.status import BATCH_OPEN, BatchStatus


class QuotaExceededError(CoreError):
    """An owner is over a limit: retry after ``retry_after_s`` (HTTP 429 with
    ``Retry-After``)."""

    def __init__(self, code: str, message: str, retry_after_s: float, param: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class PriorityNotAllowedError(CoreError):
    """The key may not use priority ``high`` (HTTP 403 naming ``param``)."""

    code = "priority_not_allowed"

    def __init__(self, param: str) -> None:
        super().__init__(
            f"{param}: this API key may not use priority 'high' "
            "(create one with `genq keys create --high-priority`)",
            param=param,
        )


def check_priority(may_use_high: bool, priorities: Iterable[tuple[str, str]]) -> None:
    """Raise for the first ``(param, priority)`` that is ``high`` unless allowed."""
    if may_use_high:
        return
    for param, priority in priorities:
        if priority == "high":
            raise PriorityNotAllowedError(param)


# The first key of the two-key advisory locks genq takes per owner (the second is
# hashtext(owner)): an arbitrary constant, so no other user of advisory locks on
# the same database collides with these by chance.
OWNER_LOCK_SPACE = 0x67_6E_71  # "gnq"


def lock_owner(session: Session, owner: str) -> None:
    """Hold the owner's quota lock until this transaction ends (commit or rollback),
    so the owner's next check counts what this transaction inserts.

    On PostgreSQL a transaction-scoped advisory lock on ``hashtext(owner)`` (two
    owners whose hashes collide merely wait for each other); other owners never wait.
    On SQLite the database's write lock, taken now by an empty write: SQLite runs one
    writer at a time, but a read does not start a transaction there (pysqlite), so
    without it two submits could both count before either inserts."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(OWNER_LOCK_SPACE, func.hashtext(owner))))
    elif dialect == "sqlite":
        empty = update(Job).where(text("0")).values(owner=Job.owner)
        session.execute(empty.execution_options(synchronize_session=False))


def active_jobs(session: Session, owner: str, *, up_to: int) -> int:
    """The owner's queued and running jobs, in one statement (one snapshot), without
    reading a batch's job rows:

    - its jobs of no batch, through the partial index ``ix_job_owner_active``
      (counted up to ``up_to``: a bounded scan);
    - for each of its open batches (``in_progress``, ``cancelling``, ``finalizing``),
      its requests not final yet, from its counters (:func:`core.tally.unfinished`):
      exact, since every job of the batch reaching a final status is tallied in
      the same transaction, and a cancel or expiry cancels the batch's jobs in the
      transaction that moves the batch;
    - for each batch still being validated, its input file's lines, or the job
      rows written so far where that is more (``genq run``'s batches have no file):
      a file's lines count its blank and invalid lines too, erring toward a
      refusal; its rows once written are not counted again.
    """
    statement = _active_jobs_count(session.get_bind().dialect.name)
    count = session.scalar(statement, {"owner": owner, "up_to": up_to})
    return int(count or 0)


@functools.cache
def _active_jobs_count(dialect: str) -> Select[Any]:
    """:func:`active_jobs`'s statement, built once per dialect (building it took
    longer than running it), with the parameters ``owner`` and ``up_to``."""
    owner = bindparam("owner", type_=String())
    # SQLite is told which index to read: left to itself it picks ix_job_owner_status
    # (owner and status match) and reads every row of the owner's batches to test
    # batch_id.
    jobs = job_through("ix_job_owner_active", dialect)
    loose = (
        select(literal_column("1"))
        .select_from(jobs)
        .where(literal_column("owner") == owner, text(LOOSE_ACTIVE))
        .limit(bindparam("up_to", type_=Integer()))
        .subquery()
    )
    in_batches = tally.unfinished((Batch.owner == owner) & Batch.status.in_(BATCH_OPEN))
    return select(
        select(func.count()).select_from(loose).scalar_subquery()
        + in_batches
        + validating_lines(owner)
    )


def validating_lines(owner: ColumnElement[str]) -> ScalarSelect[Any]:
    """The lines of the owner's batches still being validated, as a scalar subquery:
    per batch, its input file's lines or its rows written so far, the larger."""
    lines = func.coalesce(File.lines, 0)
    larger = case((lines > Batch.ingested, lines), else_=Batch.ingested)
    return (
        select(func.coalesce(func.sum(larger), 0))
        .select_from(Batch)
        .outerjoin(File, File.id == Batch.input_file_id)
        .where(Batch.owner == owner, Batch.status == BatchStatus.VALIDATING)
        .scalar_subquery()
    )


def check_active_jobs(session: Session, owner: str, adding: int, limit: int) -> None:
    """Raise if ``adding`` more jobs would take the owner past ``limit`` queued +
    running jobs (0: no limit). Takes the owner's lock (:func:`lock_owner`) first:
    the caller inserts the jobs and commits in the same transaction."""
    if limit <= 0:
        return
    if adding > limit:
        raise QuotaExceededError(
            "quota_exceeded",
            f"{adding} jobs are more than the limit of {limit} queued or running jobs per "
            "owner (GENQ_QUOTA_ACTIVE_JOBS)",
            retry_after_s=60,
        )
    lock_owner(session, owner)
    # A batch being validated has committed its row (releasing the lock) before its
    # jobs: its file's lines count in full meanwhile, or two batches would pass
    # together (see active_jobs).
    now = active_jobs(session, owner, up_to=limit)
    if now + adding > limit:
        raise QuotaExceededError(
            "quota_exceeded",
            f"the owner has {now} queued or running jobs; {adding} more would pass the limit "
            f"of {limit} (GENQ_QUOTA_ACTIVE_JOBS): retry when some have finished",
            retry_after_s=30,
        )


def stored_bytes(session: Session, owner: str) -> int:
    """The bytes of the owner's uploaded files (outputs are made on demand: free)."""
    total = session.scalar(
        select(func.coalesce(func.sum(File.bytes), 0)).where(
            File.owner == owner, File.virtual.is_(None)
        )
    )
    return int(total or 0)


def check_file_bytes(
    session: Session, owner: str, adding: int, limit: int, *, lock: bool = False
) -> None:
    """Raise if the owner's files plus ``adding`` bytes would pass ``limit`` (0: none).
    With ``lock``, takes the owner's lock (:func:`lock_owner`) first: for the check
    of a stored, uncommitted upload that the caller commits in the same transaction."""
    if limit <= 0:
        return
    if lock:
        lock_owner(session, owner)
    now = stored_bytes(session, owner)
    if now + adding > limit:
        raise QuotaExceededError(
            "storage_quota_exceeded",
            f"the owner's files hold {now} bytes; this one would pass the limit of {limit} "
            "(GENQ_QUOTA_FILE_BYTES): delete some files",
            retry_after_s=3600,
            param="file",
        )


class RateLimiter:
    """A token bucket per owner: ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # owner: (tokens, at)
        self._lock = threading.Lock()

    def wait(self, owner: str, now: float | None = None) -> float | None:
        """None if there is a token now (spending none), else the seconds until there is."""
        if self.rate <= 0:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(owner, now)
        return None if tokens >= 1 else (1 - tokens) / self.rate

    def _tokens(self, owner: str, now: float) -> float:
        tokens, at = self._buckets.get(owner, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def take(self, owner: str, now: float | None = None) -> float | None:
        """Spend one token; None if there was one, else the seconds until there is."""
        if self.rate <= 0:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(owner, now)
            if tokens < 1:
                self._buckets[owner] = (tokens, now)
                return (1 - tokens) / self.rate
            self._buckets[owner] = (tokens - 1, now)
            if len(self._buckets) > self.max_keys:
                self._forget(now)
            return None

    def _forget(self, now: float) -> None:
        """Bound the buckets kept: forget those refilled by ``now`` (a full bucket is
        what an unknown key gets anyway), then, if still over ``max_keys`` (a flood of
        new keys within one refill), the longest untouched. Called when there are
        more than ``max_keys``, so it runs at most once per ``max_keys / 2`` takes."""
        full = [key for key in self._buckets if self._tokens(key, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        excess = len(self._buckets) - self.max_keys // 2
        if excess > 0:
            oldest = sorted(self._buckets, key=lambda key: self._buckets[key][1])[:excess]
            for key in oldest:
                del self._buckets[key]

    def check(self, owner: str) -> None:
        """Raise :class:`QuotaExceededError` when the owner is over its rate."""
        wait = self.take(owner)
        if wait is not None:
            raise QuotaExceededError(
                "rate_limited",
                f"more than {self.rate:g} requests a second (GENQ_QUOTA_REQUESTS_PER_S)",
                retry_after_s=wait,
            )


class StreamSlots:
    """At most ``limit`` open long requests (event streams, waiting completions) per
    owner in this process (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, owner: str) -> None:
        """Take a slot (give it back with :meth:`release`), or raise
        :class:`QuotaExceededError`."""
        with self._lock:
            if self.limit > 0 and self._open.get(owner, 0) >= self.limit:
                raise QuotaExceededError(
                    "too_many_streams",
                    f"the owner has {self.limit} event streams or waiting completions open, "
                    "the limit (GENQ_QUOTA_STREAMS): close one",
                    retry_after_s=5,
                )
            self._open[owner] = self._open.get(owner, 0) + 1

    def release(self, owner: str) -> None:
        with self._lock:
            self._open[owner] -= 1
            if not self._open[owner]:
                del self._open[owner]

    @contextlib.contextmanager
    def hold(self, owner: str) -> Iterator[None]:
        """Hold a slot while the block runs, or raise :class:`QuotaExceededError`."""
        self.acquire(owner)
        try:
            yield
        finally:
            self.release(owner)

    def open(self, owner: str) -> int:
        with self._lock:
            return self._open.get(owner, 0)


class AuthFailures:
    """Wrong API keys per client address: a bucket of ``burst`` failures refilled at
    ``rate`` a second (``GENQ_QUOTA_AUTH_FAILURE_BURST``, ``GENQ_QUOTA_AUTH_FAILURES_PER_S``;
    rate 0: no limit). Once an address has spent it, every request from it that
    carries a key is answered 429 *before* its key is looked at, valid or not, until
    a failure's worth has refilled: were a valid key let through, the 429s would not
    slow guessing down (the one right guess would still be told apart). Requests
    with a valid key spend nothing, so users behind the same address are blocked
    only while someone there keeps sending wrong keys. An IPv6 client is counted
    per /64 (:func:`client_network`); at most ``max_addresses`` are remembered, those
    refilled forgotten first."""

    def __init__(self, rate: float, burst: int, *, max_addresses: int = 100_000) -> None:
        self._bucket = RateLimiter(rate, burst, max_keys=max_addresses)

    def check(self, address: str, now: float | None = None) -> None:
        """Raise :class:`QuotaExceededError` while ``address`` is over its failures."""
        wait = self._bucket.wait(client_network(address), now)
        if wait is not None:
            raise QuotaExceededError(
                "too_many_auth_failures",
                "too many requests with a wrong API key from this address "
                f"(GENQ_QUOTA_AUTH_FAILURE_BURST {self._bucket.burst}, refilled at "
                f"{self._bucket.rate:g} a second)",
                retry_after_s=wait,
            )

    def failed(self, address: str, now: float | None = None) -> None:
        """Count one wrong key from ``address``."""
        self._bucket.take(client_network(address), now)


def client_network(address: str) -> str:
    """What the wrong-key limit counts per: an IPv4 address, or the /64 of an IPv6
    one (a host is given a whole /64 and can take a new address from it for every
    request, so counting per IPv6 address would limit nothing); anything else
    (``testclient``, a unix socket) as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
