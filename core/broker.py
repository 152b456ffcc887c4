"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, polled often.

kombu's stock transport polls once a second and hands every transport option to
``create_engine``, so neither the polling interval nor SQLite's pragmas can be
set through options; this subclass sets both. Used when GENQ_BROKER_URL is
unset (or any ``sqla+`` URL).
"""

from __future__ import annotations

from typing import Any

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


def register() -> None:
    """Make ``sqla+`` broker URLs use :class:`EmbeddedTransport` in this process."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["sqla"] = f"{__name__}:EmbeddedTransport"
