"""The writer of a batch's job rows during its ingest, a chunk per transaction.

On PostgreSQL each row goes to the server as soon as it is built: a chunk's ``COPY``
is opened at its first row, on a connection of its own, and each row is streamed
while the next lines are parsed and validated, so the server writes and indexes
the rows (8 indexes on ``job``) meanwhile; at the chunk's last row the heartbeat is
renewed and the chunk committed. Before, a chunk's 1,000 rows were sent once built
and the ingest waited for the server to take them in, idle (bench/README.md,
"Ingest alone"). There is no thread: a background writer thread was measured
slower, its waits on the database and the parser contending for the GIL.

On SQLite (one writer at a time) a chunk's rows are kept until its last one and
written with the driver's ``executemany`` on the caller's session, so that the
database's write lock is held for the write alone, not while lines are parsed.

Either way a chunk is committed whole or not at all
(:func:`core.batches.staging.write_chunk`, :func:`core.batches.staging.touch`: the
heartbeat renewal, and :class:`core.batches.staging.IngestAbandonedError` when the
sweeper has taken the batch over), in input order, and the open chunk is rolled
back when the ingest stops before its end (:meth:`ChunkWriter.abort`, or leaving
:func:`chunk_writer` on an exception).
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.batches import staging
from core.db import get_side_engine

log = logging.getLogger(__name__)

Row = dict[str, Any]


class ChunkWriter(abc.ABC):
    """Adds a validating batch's job rows (of :func:`core.submit.job_row`), in order,
    committing every :data:`core.batches.staging.CHUNK_ROWS`; use :func:`chunk_writer`."""

    def __init__(self, session: Session, batch_id: str) -> None:
        self._session, self._batch_id = session, batch_id
        self.committed = 0
        """Rows committed: the open chunk's first position."""
        self.open_ids: list[str] = []
        """The custom_ids of the open chunk's rows, in order."""

    @abc.abstractmethod
    def add(self, row: Row) -> None:
        """Add ``row`` to the open chunk; commit the chunk once it is full."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Commit the open chunk (nothing if it is empty)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the open chunk's rows, uncommitted (nothing if it is empty)."""

    def close(self) -> None:
        """Release what the writer holds (the open chunk is dropped)."""
        self.abort()


class _Buffered(ChunkWriter):
    """The rows of a chunk kept until it is full, then written on the caller's session."""

    def __init__(self, session: Session, batch_id: str) -> None:
        super().__init__(session, batch_id)
        self._rows: list[Row] = []

    def add(self, row: Row) -> None:
        self._rows.append(row)
        self.open_ids.append(row["custom_id"])
        if len(self._rows) >= staging.CHUNK_ROWS:
            self.commit()

    def commit(self) -> None:
        if self._rows:
            staging.write_chunk(self._session, self._batch_id, self._rows)
            self.committed += len(self._rows)
            self.abort()

    def abort(self) -> None:
        self._rows = []
        self.open_ids = []


class _Streamed(ChunkWriter):
    """Each row streamed to PostgreSQL by ``COPY`` as it is added, on a connection of the
    writer's own (the caller's session goes on reading the input and earlier rows)."""

    def __init__(self, session: Session, batch_id: str, connection: Connection) -> None:
        super().__init__(session, batch_id)
        self._connection = connection
        self._own = Session(bind=connection, expire_on_commit=False)
        self._copy: staging.RowCopy | None = None

    def add(self, row: Row) -> None:
        if self._copy is None:
            self._copy = staging.RowCopy(self._own)
        self._copy.write(row)
        self.open_ids.append(row["custom_id"])
        if len(self.open_ids) >= staging.CHUNK_ROWS:
            self.commit()

    def commit(self) -> None:
        if self._copy is None:
            return
        copy, self._copy = self._copy, None
        try:
            copy.finish()
            staging.touch(self._own, self._batch_id, written=len(self.open_ids))
            self._own.commit()
        except BaseException:
            self._own.rollback()
            self.open_ids = []
            raise
        self.committed += len(self.open_ids)
        self.open_ids = []
        # The caller's session only read since (the input file, earlier rows): end its
        # transaction, so it never sits in one for the whole ingest (core.db's limit).
        self._session.commit()

    def abort(self) -> None:
        copy, self._copy = self._copy, None
        self.open_ids = []
        if copy is not None:
            try:
                copy.cancel()
            finally:
                self._own.rollback()

    def close(self) -> None:
        try:
            self.abort()
        except Exception:
            # Its connection failed (the error that ended the ingest, or another):
            # the chunk is not committed either way; the pool drops the connection.
            log.warning("batch %s: could not end the open chunk", self._batch_id, exc_info=True)
            self._own.invalidate()
        else:
            self._own.close()
        finally:
            self._connection.close()


@contextlib.contextmanager
def chunk_writer(session: Session, batch_id: str) -> Iterator[ChunkWriter]:
    """A :class:`ChunkWriter` for ``batch_id``: rows streamed on PostgreSQL, buffered
    elsewhere (and where ``session`` is bound to one connection, not an engine). Its
    open chunk is dropped and its connection released on the way out, also on an
    exception: commit the last chunk in the block."""
    bind = session.get_bind()
    writer: ChunkWriter = _Buffered(session, batch_id)
    if bind.dialect.name == "postgresql" and isinstance(bind, Engine):
        # Not a pooled connection: the caller holds one of the pool's while it reads
        # the input, and so many ingests at once could each wait for a second one.
        url = bind.url.render_as_string(hide_password=False)
        try:
            writer = _Streamed(session, batch_id, get_side_engine(url).connect())
        except OperationalError:  # the server takes no more connections: as elsewhere
            log.warning("batch %s: rows written a chunk at a time", batch_id, exc_info=True)
    try:
        yield writer
    finally:
        writer.close()
