"""Where the feeder's last top-up of each batch queue ended, so the next starts there.

A job the feeder sends leaves ``ix_job_unsent``, but its entry stays in the index
until vacuum removes it, and autovacuum may not vacuum the job table for the whole
of a large batch. A top-up that reads the batch's unsent jobs from the start steps
over the entry of every job sent so far: at 200k sent, each top-up took seconds,
and in a 1M-line batch the top-up was the largest cost left in the run.

So each process remembers, per (database, batch, model, priority), the last job id
it took, and the next top-up reads the ids after it. That is a hint, never the
truth: jobs below it can be unsent again (a row another feeder had locked whose
transaction rolled back, a take of this process whose commit failed, ``genq run``
resuming a batch). The rows below the cursor are read too, which costs what a
top-up used to cost, whenever the ids after it run short (the batch's tail, where a
job left behind would otherwise wait longest) and at least every
:data:`LOOK_BEHIND_EVERY_S`. Nothing is lost on a restart: a new process starts
with no cursor and reads from the start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

LOOK_BEHIND_EVERY_S = 60.0

Key = tuple[str, str, str, str]  # database URL, batch id, model, priority


class FeedCursors:
    """The last id taken per batch queue, with when the rows behind it were last read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._after: dict[Key, tuple[str, float]] = {}

    def after(self, key: Key) -> str | None:
        """The id to read after, or None when the whole batch queue is to be read
        (no cursor yet, or the rows behind it are due a look)."""
        with self._lock:
            found = self._after.get(key)
        if found is None or time.monotonic() - found[1] > LOOK_BEHIND_EVERY_S:
            return None
        return found[0]

    def advance(self, key: Key, last_id: str, *, looked_behind: bool) -> None:
        """Record ``last_id`` as taken (the cursor never moves back); a look behind
        it restarts the clock."""
        now = time.monotonic()
        with self._lock:
            old = self._after.get(key)
            if old is None:
                self._after[key] = (last_id, now)
                return
            cursor = max(old[0], last_id)
            self._after[key] = (cursor, now if looked_behind else old[1])

    def forget(self, database: str, batch_ids: Iterable[str]) -> None:
        """Drop the cursors of these batches (their jobs handed back to the feeder)."""
        gone = set(batch_ids)
        with self._lock:
            for key in [k for k in self._after if k[0] == database and k[1] in gone]:
                del self._after[key]

    def keep_only(self, database: str, batch_ids: Iterable[str]) -> None:
        """Drop the cursors of batches no longer fed (finished, cancelled, sent)."""
        live = set(batch_ids)
        with self._lock:
            for key in [k for k in self._after if k[0] == database and k[1] not in live]:
                del self._after[key]


CURSORS = FeedCursors()
