"""kombu's transports as genq uses them.

The embedded broker: kombu's SQLAlchemy transport on a SQLite file, polled often.
kombu's stock transport polls once a second and hands every transport option to
``create_engine``, so neither the polling interval nor SQLite's pragmas can be
set through options; this subclass sets both. Used when GENQ_BROKER_URL is
unset (or any ``sqla+`` URL).

Redis: kombu's transport, with one client per channel for its synchronous commands
(publish, ack, queue sizes). kombu builds a new ``redis.Redis`` for each of them,
and redis-py's constructor (its table of response callbacks) costs ~0.1 ms of CPU,
about a third of a publish; the client is thread-safe and takes a connection from
the channel's pool for each command either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.sqlalchemy import Channel, Transport
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from core.db import prepare_sqlite_path, sqlite_pragmas


class EmbeddedChannel(Channel):  # type: ignore[misc]
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
