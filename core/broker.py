"""kombu's transports as genq uses them.

The embedded broker: kombu's SQLAlchemy transport on a SQLite file, polled often.
kombu's stock transport polls once a second and hands every transport option to
``create_engine``, so neither the polling interval nor SQLite's pragmas can be
set through options; this subclass sets both. Used when GENQ_BROKER_URL is
unset (or any ``sqla+`` URL).

Redis: kombu's transport, with two changes.

- One client per channel for its synchronous commands (publish, ack, queue sizes).
  kombu builds a new ``redis.Redis`` for each of them, and redis-py's constructor
  (its table of response callbacks) costs ~0.1 ms of CPU, about a third of a
  publish; the client is thread-safe and takes a connection from the channel's pool
  for each command either way.
- The last ``urgent_prefetch`` places of a worker's prefetch are for its urgent
  queues (``urgent_lanes``: high and express, :func:`core.queue.celery_config`).
  Celery's prefetch limit counts a worker's messages, whatever their queue: under a
  batch every place holds a batch message waiting for job slots, and a web app's job
  was not even read until one of them finished. Past ``prefetch - urgent_prefetch``
  messages the channel waits on the urgent queues alone (a short BRPOP, so a batch
  message is read again soon after a place frees).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.sqlalchemy import Channel, Transport
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from core.db import prepare_sqlite_path, sqlite_pragmas


class EmbeddedChannel(Channel):  # type: ignore[misc]
    """kombu's SQLAlchemy channel; its engine is kombu's own, so a ``sqla+postgresql``
    broker does not get genq's connection probes (core.db.client_limits): the embedded
    broker is meant for SQLite, on one machine."""

    def _engine_from_config(self) -> Engine:
        url = make_url(self.connection.client.hostname)
        if url.get_backend_name() == "sqlite":
            prepare_sqlite_path(url.database)
        engine: Engine = super()._engine_from_config()
        if url.get_backend_name() == "sqlite":
            event.listen(engine, "connect", sqlite_pragmas)
        return engine


class EmbeddedTransport(Transport):  # type: ignore[misc]
    """kombu's SQLAlchemy transport with a 50 ms polling interval."""

    Channel = EmbeddedChannel
    polling_interval = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.polling_interval = 0.05


class RedisChannel(kombu_redis.Channel):  # type: ignore[misc]
    _sync_client: Any = None
    urgent_prefetch = 0
    urgent_lanes: tuple[str, ...] = ()
    urgent_poll_s = 0.1
    from_transport_options: tuple[str, ...] = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "urgent_prefetch",
        "urgent_lanes",
    )

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._urgent_only()
        if queues is None:
            super()._brpop_start(timeout)
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        command = ["BRPOP", *keys, self.urgent_poll_s]
        if self.global_keyprefix:
            command = self.client._prefix_args(command)
        self.client.connection.send_command(*command)

    def _urgent_only(self) -> list[str] | None:
        """The urgent queues to read, in order, when the prefetch places left are
        theirs alone; None when any queue may be read."""
        limit = self.qos.prefetch_count
        if not self.urgent_prefetch or not limit:
            return None
        held = len(self.qos._delivered) - len(self.qos._dirty)
        if held < limit - self.urgent_prefetch:
            return None
        queues = self._queue_cycle.consume(len(self.active_queues))
        urgent = [q for q in queues if q.rpartition(".")[2] in self.urgent_lanes]
        return urgent or None  # a worker of no urgent queue: its prefetch as usual

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        cached = self._sync_client
        if cached is None or cached.connection_pool is not self.pool:  # a new pool: anew
            cached = self._sync_client = self._create_client()
        yield cached


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport, its channels reusing one client (module docstring)."""

    Channel = RedisChannel


def register() -> None:
    """Make ``sqla+`` broker URLs use :class:`EmbeddedTransport` and ``redis(s)://``
    ones :class:`RedisTransport` in this process."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["sqla"] = f"{__name__}:EmbeddedTransport"
    TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = f"{__name__}:RedisTransport"
