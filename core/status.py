"""Job and batch statuses and the transitions allowed between them, in one place.

The functions that move a row from one status to another live in
:mod:`core.jobstate` (jobs) and :mod:`core.batches.lifecycle` (batches); each one
names its source statuses, and :func:`sources` checks them against these tables,
so the tables are the rules and not a comment beside them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)

# A running job goes back to queued when its attempt is handed back (shutdown,
# lost worker); a final status never changes again.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class BatchStatus(enum.StrEnum):
    """Where a batch is in its life (OpenAI's batch statuses).

    A batch is ``validating`` while its ingest writes its jobs in chunks
    (core.batches.staging); its jobs are not sent until it is ``in_progress``.
    """

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in BATCH_FINAL


BATCH_FINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
BATCH_OPEN = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING)

# A batch is finalized through ``finalizing`` (claimed by one finalizer) into the
# final status its source implies; ``in_progress`` may also be cancelled.
BATCH_TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset({BatchStatus.IN_PROGRESS, BatchStatus.FAILED}),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.FINALIZING, BatchStatus.CANCELLING}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.FINALIZING}),
    BatchStatus.FINALIZING: frozenset(
        {BatchStatus.FINALIZING, BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED}
    ),
    BatchStatus.COMPLETED: frozenset(),
    BatchStatus.FAILED: frozenset(),
    BatchStatus.EXPIRED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}


S = TypeVar("S", JobStatus, BatchStatus)


def sources(table: Mapping[S, frozenset[S]], target: S, *allowed: S) -> tuple[S, ...]:
    """``allowed``, checked to be statuses that ``table`` lets move to ``target``:
    the WHERE of a transition's UPDATE. Raises at import time if a transition
    function asks for a move the rules forbid."""
    for source in allowed:
        if target not in table[source]:
            raise ValueError(f"{source} -> {target} is not an allowed transition")
    return allowed
