"""A worker cut off from the network in the middle of a transaction must not stall
the cluster: PostgreSQL cannot tell a silent client from a slow one, so without a
limit the locks of the cut worker's open transaction are held until TCP gives up
on it (hours), and the sweeper, which must take those rows to hand the jobs back,
waits as long. genq's connections ask the server to end a session idle inside a
transaction for longer than ``core.db.IDLE_IN_TRANSACTION_TIMEOUT_S``."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from core import db, jobstate, submit
from core.models import Job
from core.queue import Route, celery_config
from core.schemas import JobCreate
from core.settings import Settings
from tests.conftest import RecordingQueue


def test_a_client_silent_inside_a_transaction_does_not_block_the_sweep(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "IDLE_IN_TRANSACTION_TIMEOUT_S", 1.0)
    url = f"{postgres_url}?application_name=genq-silent-client"  # an engine of its own
    settings = Settings(data_dir=tmp_path, database_url=url, model="fake", require_auth=False)
    with db.session_scope(url) as session:
        job, _ = submit.submit_job(
            session, RecordingQueue(), JobCreate(prompt="a b"), settings=settings
        )
    with db.session_scope(url) as session:
        claims, _ = jobstate.claim_fresh(session, [job.id], worker="cut", lease_s=0.001)
    (claim,) = claims

    def sweep() -> tuple[list[Route], list[str]]:
        with db.session_scope(url) as session:
            return jobstate.reclaim_expired(session, max_attempts=3)

    # The cut worker: its store's UPDATE took the row lock, then it fell silent.
    silent = db.get_sessionmaker(url)()
    silent.execute(text("SELECT 1"))
    failure = jobstate.Failure("boom", "never committed")
    jobstate.store_outcomes(silent, [(claim, failure)])

    # Sweeps skip rows another transaction holds, so none waits on the silent client;
    # once the server has ended its session (the limit above), a sweep hands the job back.
    requeued: list[Route] = []
    deadline = time.monotonic() + 30  # 30 times the limit: never released, not slow
    while not requeued and time.monotonic() < deadline:
        swept: list[tuple[list[Route], list[str]]] = []
        sweeper = threading.Thread(target=lambda out=swept: out.append(sweep()), daemon=True)
        sweeper.start()
        sweeper.join(timeout=30)
        blocked = sweeper.is_alive()
        if blocked:
            silent.rollback()  # let the sweeper go before failing
            sweeper.join()
        assert not blocked, "the sweep waited on a silent client's transaction"
        ((requeued, failed),) = swept
        assert failed == []
        time.sleep(0.2)
    assert [route.job_id for route in requeued] == [job.id], "the silent client kept its lock"
    # The server ended the silent session; when the worker comes back, its retry
    # loop takes that for an outage, and its retried write is refused by the token.
    with pytest.raises(DBAPIError) as ended:
        silent.commit()
    silent.close()
    assert db.is_transient(ended.value), ended.value
    retried = db.run_with_retry(
        lambda session: jobstate.store_outcomes(session, [(claim, failure)]), url, retry_s=5
    )
    assert retried == [False]
    with db.session_scope(url) as session:
        assert session.get(Job, job.id).status == "queued"  # type: ignore[union-attr]


def test_genq_asks_the_server_to_probe_a_silent_peer_unless_the_url_says_otherwise(
    postgres_url: str,
) -> None:
    """A peer cut off mid-pipeline is found out only by TCP (tests/integration/
    test_dead_peer.py shows it on a real cut link); a URL's own setting wins."""
    if not make_url(postgres_url).host:
        pytest.skip("the server probes TCP peers only; this database is on a Unix socket")
    own = "options=-c%20tcp_keepalives_idle%3D120"
    for url, idle in ((postgres_url, db.TCP_KEEPALIVE_IDLE_S), (f"{postgres_url}?{own}", 120)):
        with db.get_engine(url).connect() as conn:
            shown = {
                name: conn.execute(text(f"SHOW {name}")).scalar()
                for name in ("tcp_keepalives_idle", "tcp_keepalives_count", "tcp_user_timeout")
            }
        assert shown == {
            "tcp_keepalives_idle": str(idle),
            "tcp_keepalives_count": str(db.TCP_KEEPALIVE_COUNT),
            "tcp_user_timeout": str(db.TCP_USER_TIMEOUT_S * 1000),
        }


def test_genq_probes_a_silent_server_itself_unless_the_url_says_otherwise(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection waiting for an answer its link lost learns of it only from its
    own probes (tests/integration/test_dead_peer.py shows it on a real cut link); a
    URL's own setting wins, and a pool-less engine is probed too."""
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    own = f"{postgres_url}?keepalives_idle=120"
    try:
        for url, idle in ((postgres_url, db.TCP_KEEPALIVE_IDLE_S), (own, 120)):
            for engine in (db.get_engine(url), db.get_side_engine(url)):
                with engine.connect() as conn:
                    params = conn.connection.driver_connection.info.get_parameters()  # type: ignore[union-attr]
                assert {name: params.get(name) for name in db.client_limits(postgres_url)} == {
                    "connect_timeout": str(db.CONNECT_TIMEOUT_S),
                    "keepalives": "1",
                    "keepalives_idle": str(idle),
                    "keepalives_interval": str(db.TCP_KEEPALIVE_INTERVAL_S),
                    "keepalives_count": str(db.TCP_KEEPALIVE_COUNT),
                }
    finally:
        db.get_engine(own).dispose()
    assert db.client_limits("sqlite:///genq.db") == {}
    assert db.client_limits("postgresql+pg8000://postgres@db/genq") == {}  # not libpq
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "")  # set but empty: libpq's default, not ours
    assert db.client_limits(postgres_url)["connect_timeout"] == db.CONNECT_TIMEOUT_S
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "30")
    assert "connect_timeout" not in db.client_limits(postgres_url)


def test_genq_probes_a_silent_redis_broker(tmp_path: Path) -> None:
    """The same probes on the broker's connections (tests/integration/test_dead_broker.py
    shows them on a real cut link); the embedded SQL broker has no TCP of its own."""
    redis = celery_config(Settings(data_dir=tmp_path, broker_url="redis://broker:6379/0"))
    options = redis["broker_transport_options"]
    assert options["socket_keepalive"] is True
    assert options["socket_connect_timeout"] == db.CONNECT_TIMEOUT_S
    assert options["socket_keepalive_options"] == {
        socket.TCP_KEEPIDLE: db.TCP_KEEPALIVE_IDLE_S,
        socket.TCP_KEEPINTVL: db.TCP_KEEPALIVE_INTERVAL_S,
        socket.TCP_KEEPCNT: db.TCP_KEEPALIVE_COUNT,
    }
    assert "broker_transport_options" not in celery_config(Settings(data_dir=tmp_path))
