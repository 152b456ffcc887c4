"""A worker cut off in the middle of a pipeline must not hold its row locks for hours.

psycopg sends an ``executemany`` (a worker's grouped store) as a pipeline: Parse,
Bind and Execute for each row, one Sync at the end. A worker whose link dies after
the server has run some of those statements, but before the Sync arrives, leaves a
session that is not idle in a transaction (``idle_in_transaction_session_timeout``
does not apply): it is active, waiting for the rest, holding the rows it updated.
No PostgreSQL 15 timeout ends that wait; only TCP can tell that the peer is gone,
which by default takes two hours. The sweeper skips locked rows, so the cut
worker's jobs stayed ``running`` that long (the partition test hung on it in CI).

genq's connections ask the server to probe a silent peer (``core.db.session_limits``).
This test runs a PostgreSQL server of its own on the hub address of a
:class:`~tests.integration.netns.Network`, so that the server's TCP peer is the cut
host itself (no forwarder in between answers for it), and checks that the server
ends the cut session and rolls back what it had run.

The client's side has the same blind spot: a worker waiting for a result its link
lost has nothing to send, so by default it waits for TCP's two-hour keepalive; the
server gave up on that session long ago, and the link may be back. Its monitor
thread stalled this way sent no heartbeat after a partition healed (the partition
test hung on it in CI). genq's connections probe the server as well
(``core.db.client_limits``); the second test checks that a cut query fails over to a
retry that succeeds once the link is back.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from core import db
from tests.integration.helpers import free_port, python_process, wait_until
from tests.integration.netns import Network, unavailable_reason


def _postgres_bindir() -> Path | None:
    if shutil.which("pg_config") is None:
        return None
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
    bindir = Path(out.stdout.strip())
    return bindir if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists() else None


def _server_unavailable() -> str | None:
    if (reason := unavailable_reason()) is not None:
        return reason
    if _postgres_bindir() is None:
        return "no PostgreSQL server binaries (pg_config --bindir)"
    if shutil.which("runuser") is None:
        return "no runuser (PostgreSQL will not run as root)"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user to run a server as"
    return None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        (reason := _server_unavailable()) is not None, reason=f"dead peer test: {reason}"
    ),
]

# The cut client: takes a row lock inside a pipeline whose Sync never comes, then
# waits. It connects through genq's engine, so genq's session limits are set. With
# "output", it also asks for a result the server sends only after the cut: data the
# server sent and the peer never acknowledged stops the keepalive probes, and only
# ``tcp_user_timeout`` ends the session (else TCP retransmits for about 15 minutes).
CLIENT = """
import sys, time
from core import db
pgconn = db.get_engine(sys.argv[1]).raw_connection().driver_connection.pgconn
pgconn.enter_pipeline_mode()
pgconn.send_query_params(b"UPDATE held SET v = v + 1 WHERE id = 1", None)
if sys.argv[2] == "output":
    pgconn.send_query_params(b"SELECT pg_sleep(5), repeat('x', 200000)", None)
    pgconn.send_flush_request()
while pgconn.flush():
    time.sleep(0.01)
print("sent", flush=True)
time.sleep(3600)
"""


@contextlib.contextmanager
def private_postgres(net: Network) -> Iterator[str]:
    """A throwaway PostgreSQL server listening on the hub address; yields its URL."""
    bindir = _postgres_bindir()
    assert bindir is not None
    data = Path(tempfile.mkdtemp(prefix="genq-deadpeer-"))
    shutil.chown(data, "postgres", "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "initdb"),
            "-D",
            str(data / "db"),
            "-A",
            "trust",
            "-U",
            "postgres",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with (data / "db" / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {net.range} trust\n")
    port = free_port(net.hub)
    options = f"-c listen_addresses={net.hub} -p {port} -k {data} -c fsync=off"
    ctl = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data / "db")]
    subprocess.run(
        [*ctl, "-o", options, "-l", str(data / "server.log"), "-w", "start"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql://postgres@{net.hub}:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def _locked(admin: psycopg.Connection) -> bool:
    """Whether another session holds the row's lock (a NOWAIT lock fails)."""
    try:
        with admin.transaction():
            admin.execute("SELECT v FROM held WHERE id = 1 FOR UPDATE NOWAIT")
    except psycopg.errors.LockNotAvailable:
        return True
    return False


@pytest.mark.parametrize("server_sends", ["nothing", "output"])
def test_the_server_ends_a_session_cut_off_in_the_middle_of_a_pipeline(
    tmp_path: Path, server_sends: str
) -> None:
    with Network(1) as net, private_postgres(net) as url:
        admin = psycopg.connect(url, autocommit=True)
        admin.execute("CREATE TABLE held (id int PRIMARY KEY, v int NOT NULL)")
        admin.execute("INSERT INTO held VALUES (1, 0)")
        log = tmp_path / "client.log"
        client_url = url.replace("postgresql://", "postgresql+psycopg://")
        client = python_process(CLIENT, [client_url, server_sends], log, prefix=net.command(0, []))
        try:
            wait_until(lambda: "sent" in log.read_text(), 60, "the client's statement", log)
            wait_until(lambda: _locked(admin), 30, "the client's row lock", log)
            (state,) = admin.execute(
                "SELECT state FROM pg_stat_activity"
                " WHERE query LIKE 'UPDATE held%' OR query LIKE 'SELECT pg_sleep%'"
            ).fetchone() or (None,)
            assert state == "active"  # inside the pipeline: not "idle in transaction"

            net.cut(0)
            cut_at = time.monotonic()
            # A liveness deadline, four times the limit: without it the lock is held
            # for the kernel's defaults (two hours of keepalive, or 15 minutes of
            # retransmissions). On Linux the user timeout also bounds the probes.
            limit = min(
                db.TCP_USER_TIMEOUT_S,
                db.TCP_KEEPALIVE_IDLE_S + db.TCP_KEEPALIVE_INTERVAL_S * db.TCP_KEEPALIVE_COUNT,
            )
            wait_until(lambda: not _locked(admin), 4 * limit + 3, "the cut session's lock", log)
            released_s = time.monotonic() - cut_at
            print(
                f"\nDEAD PEER ({server_sends} sent after the cut):"
                f" lock released after {released_s:.1f} s"
            )
            (value,) = admin.execute("SELECT v FROM held WHERE id = 1").fetchone() or (None,)
            assert value == 0  # the half-sent work was rolled back
            gone = admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query LIKE 'UPDATE held%' OR query LIKE 'SELECT pg_sleep%'"
            ).fetchone()
            assert gone == (0,)
        finally:
            client.kill()
            client.wait()
            net.heal(0)
            admin.close()


# A query whose answer the cut loses (its first attempt answers after ANSWER_S), asked
# through genq's engine with its retries: it prints "result: answered" once a retry
# gets through.
ANSWER_S = 20  # longer than the test takes to cut the link
ASKING_CLIENT = """
import logging, sys
from sqlalchemy import text
from core import db
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
delays = [float(sys.argv[2])]
def ask(session):
    print("asking", flush=True)
    delay = delays.pop() if delays else 0
    return session.execute(text(f"SELECT 'answered' FROM pg_sleep({delay})")).scalar_one()
print("result:", db.run_with_retry(ask, sys.argv[1], retry_s=600), flush=True)
"""


def test_a_query_whose_answer_a_cut_lost_is_retried_once_the_link_is_back(
    tmp_path: Path,
) -> None:
    with Network(1) as net, private_postgres(net) as url:
        admin = psycopg.connect(url, autocommit=True)
        log = tmp_path / "client.log"
        client_url = url.replace("postgresql://", "postgresql+psycopg://")
        client = python_process(
            ASKING_CLIENT, [client_url, str(ANSWER_S)], log, prefix=net.command(0, [])
        )
        try:
            wait_until(
                lambda: admin.execute(
                    "SELECT 1 FROM pg_stat_activity"
                    " WHERE query LIKE 'SELECT %pg_sleep%' AND state = 'active'"
                    " AND pid <> pg_backend_pid()"
                ).fetchone(),
                60,
                "the client's query",
                log,
            )
            time.sleep(1)  # the server has acknowledged the query: nothing of ours in flight
            net.cut(0)  # the answer is lost
            cut_at = time.monotonic()
            # A liveness deadline: without the client's own probes it waits for the
            # kernel's keepalive (two hours), and no retry ever starts.
            limit = db.TCP_KEEPALIVE_IDLE_S + db.TCP_KEEPALIVE_INTERVAL_S * db.TCP_KEEPALIVE_COUNT
            wait_until(
                lambda: "database unavailable" in log.read_text(),
                4 * limit + 3,
                "the cut query given up on",
                log,
            )
            given_up_s = time.monotonic() - cut_at
            net.heal(0)
            wait_until(
                lambda: "result: answered" in log.read_text(),
                3 * (db.CONNECT_TIMEOUT_S + 5) + 3,  # + the retries' backoff (at most 5 s)
                "the retried query",
                log,
            )
            print(f"\nCUT QUERY: given up on after {given_up_s:.1f} s, answered after the heal")
            assert client.wait(timeout=30) == 0, log.read_text()
        finally:
            client.kill()
            client.wait()
            net.heal(0)
            admin.close()
