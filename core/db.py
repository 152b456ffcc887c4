"""Engine and session factories (SQLAlchemy 2.x), one engine per database URL."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")

# A genq transaction never waits on anything but the database, so a session idle
# inside one for this long has a client that is gone or cut off. PostgreSQL cannot
# tell: without a limit it keeps that transaction's row locks until TCP gives up on
# the peer (hours), and the sweeper, which must lock those rows to hand the jobs back,
# waits as long. With it, the server ends such a session and the cluster goes on; the
# cut worker's retried write is then refused by its stale lease token. Generous,
# because a bulk submit builds its rows between two statements.
IDLE_IN_TRANSACTION_TIMEOUT_S = 60.0

# That limit does not cover a client cut off in the middle of a pipeline (psycopg
# sends an ``executemany`` as one: Parse/Bind/Execute for each row, one Sync at the
# end). The server has run the statements it received and holds their row locks, but
# the session is not idle: it waits for the rest, and no PostgreSQL 15 timeout ends
# that wait. Only TCP can tell that the peer is gone, so genq's connections ask the
# server to probe a silent peer (keepalives) and to give up on data it sent that is
# never acknowledged (``tcp_user_timeout``, which on Linux also bounds the probes): a
# cut peer's session ends in about 30 s instead of hours. The same limit drops a
# client that is alive but leaves a result unread for 30 s (a full receive window);
# genq reads every result through (``yield_per`` fetches, one row per file chunk).
# Only TCP connections are probed (a Unix socket's peer is on the same machine).
TCP_KEEPALIVE_IDLE_S = 15
TCP_KEEPALIVE_INTERVAL_S = 5
TCP_KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_S = 30
# The client has the same blind spot as the server: a worker waiting for an answer
# its link lost has nothing to send, so nothing tells it the server is gone; by
# default it waits for the kernel's two-hour keepalive, long after the link is back
# (a cut worker's monitor stalled so and sent no heartbeat after the heal). genq's
# connections probe the server with the same keepalives (:func:`client_limits`; about
# 30 s), and give up on a new connection not made in CONNECT_TIMEOUT_S: both fail over
# to the caller's retries (:func:`run_with_retry`). No ``tcp_user_timeout`` on this
# side: it would also abort a live client whose server stopped reading for 30 s (a
# slow disk under a streamed ``COPY``), and a request the cut lost is retransmitted
# until the link is back, when it is answered or reset: its next retransmission, at
# most 120 s after the heal (TCP's backoff), or TCP gives up after ~15 min of cut.
CONNECT_TIMEOUT_S = 10
# The drivers that take libpq's connection parameters.
LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg2", "psycopg2cffi"})


def prepare_sqlite_path(database: str | None) -> None:
    """Create the folder of a SQLite file, so a fresh data dir just works."""
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits out short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def postgres_session_limits(dbapi_connection: Any, _record: Any) -> None:
    """Set genq's session limits (:func:`session_limits`) on a new connection, each
    unless the server, role, database or URL (``options=-c ...``) already set it."""
    wanted = session_limits()
    cursor = dbapi_connection.cursor()
    cursor.execute(
        "SELECT name FROM pg_settings WHERE source = 'default' AND name = ANY(%s)",
        (list(wanted),),
    )
    for (name,) in cursor.fetchall():
        cursor.execute(f"SET {name} = {wanted[name]}")  # names and values are ours
    cursor.close()
    dbapi_connection.commit()


def session_limits() -> dict[str, int]:
    """The PostgreSQL settings genq asks for on each connection (see above)."""
    return {
        "idle_in_transaction_session_timeout": max(1, round(IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)),
        "tcp_keepalives_idle": TCP_KEEPALIVE_IDLE_S,
        "tcp_keepalives_interval": TCP_KEEPALIVE_INTERVAL_S,
        "tcp_keepalives_count": TCP_KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_S * 1000,
    }


def client_limits(url: str) -> dict[str, int]:
    """libpq's parameters for genq's side of the probes above, each unless the URL
    sets it (``?keepalives_idle=60``) or, for the connect timeout, libpq's environment
    (a non-empty ``PGCONNECT_TIMEOUT``); none for a driver other than libpq's. They
    win over a connection service file's (``?service=``): set those in the URL. Read
    once per URL (the engines are made once)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() not in LIBPQ_DRIVERS:
        return {}
    limits = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": TCP_KEEPALIVE_IDLE_S,
        "keepalives_interval": TCP_KEEPALIVE_INTERVAL_S,
        "keepalives_count": TCP_KEEPALIVE_COUNT,
    }
    if os.environ.get("PGCONNECT_TIMEOUT", "").strip():
        del limits["connect_timeout"]
    return {name: value for name, value in limits.items() if name not in parsed.query}


@functools.cache
def get_engine(url: str) -> Engine:
    """The engine for ``url``, made once per process."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        prepare_sqlite_path(parsed.database)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_size=10, max_overflow=20, connect_args=client_limits(url))
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", postgres_session_limits)
    return engine


@functools.cache
def get_side_engine(url: str) -> Engine:
    """An engine for ``url`` without a pool: each connection is opened for its caller
    and closed after. For a connection held beside a pooled one (a batch ingest's
    streamed rows), which must never wait for the pool: with as many such callers as
    the pool has connections, each would hold one and wait for another."""
    engine = create_engine(url, poolclass=NullPool, connect_args=client_limits(url))
    if make_url(url).get_backend_name() == "postgresql":
        event.listen(engine, "connect", postgres_session_limits)
    return engine


@functools.cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with get_sessionmaker(url).begin() as session:
        yield session


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is an outage worth retrying (not a bad statement)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def run_with_retry(fn: Callable[[Session], T], url: str, *, retry_s: float) -> T:
    """Run ``fn`` in a transaction, retrying it with backoff while the database is
    unreachable, for up to ``retry_s`` seconds; then the last error is raised."""
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.1, max=5),
        stop=stop_after_delay(retry_s),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "database unavailable (%s); retrying", state.outcome and state.outcome.exception()
        ),
    )
    for attempt in retrying:
        with attempt, session_scope(url) as session:
            return fn(session)
    raise AssertionError("unreachable")  # pragma: no cover
