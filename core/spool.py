"""Parse a batch file before taking the write lock.

On SQLite one transaction writes at a time, and creating a batch holds the write
lock from its first insert to its commit. Parsing and validating 50,000 lines is
most of that time, so it is done first, with no write open (reads do not block
writers in WAL mode): the parsed requests go to a spooled temporary file (memory
up to :data:`SPOOL_MEMORY_BYTES`, then disk, so memory stays bounded whatever the
file holds), and the inserts then replay them, holding the lock only for the
writes themselves. On PostgreSQL it costs a little and changes nothing.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

SPOOL_MEMORY_BYTES = 8 * 1024 * 1024


def prevalidated(items: Iterable[Any]) -> Iterator[Any]:
    """Consume ``items`` now (parsing them); returns an iterator that replays them."""
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
    try:
        for item in items:
            pickle.dump(item, spool, protocol=pickle.HIGHEST_PROTOCOL)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return _replay(spool)


def _replay(spool: IO[bytes]) -> Iterator[Any]:
    with spool:
        while True:
            try:
                # Our own objects, written just above by this process: safe to unpickle.
                yield pickle.load(spool)
            except EOFError:
                return
