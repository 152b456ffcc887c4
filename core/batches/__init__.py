"""Batches (OpenAI's Batch API, and ``genq run``): one job row per request.

One concept per module:

- :mod:`core.batches.ingest`: parse and validate an input, create the batch and its
  jobs, streamed (sent by :mod:`core.feed`);
- :mod:`core.batches.staging`: a validating batch's jobs written and deleted a chunk
  per transaction; the sweeper's recovery of an ingest that died;
- :mod:`core.batches.writer`: the ingest's chunks, streamed to PostgreSQL as their
  rows are made (buffered on SQLite);
- :mod:`core.batches.custom_ids`: the compact table of the custom_ids seen;
- :mod:`core.batches.lifecycle`: the batch state machine (cancel, expire, finalize);
- :mod:`core.batches.results`: counts, usage, the output and error files, purge;
- :mod:`core.batches.formatting`: the OpenAI batch object.

The names below are the package's interface; callers use ``batches.<name>``.
"""

from __future__ import annotations

from core.batches.formatting import batch_object
from core.batches.ingest import (
    IngestResult,
    LineError,
    Parsed,
    create_batch,
    ingest,
    new_batch_id,
    parse_openai_file,
    parse_window,
)
from core.batches.lifecycle import (
    BatchConflictError,
    NoSuchBatchError,
    cancel_batch,
    finalize,
    finalize_due,
    get_batch,
    list_batches,
)
from core.batches.results import Counts, cancel_code, counts, file_content, purge, result_lines
from core.batches.staging import IngestAbandonedError, recover_stale

__all__ = [
    "BatchConflictError",
    "Counts",
    "IngestAbandonedError",
    "IngestResult",
    "LineError",
    "NoSuchBatchError",
    "Parsed",
    "batch_object",
    "cancel_batch",
    "cancel_code",
    "counts",
    "create_batch",
    "file_content",
    "finalize",
    "finalize_due",
    "get_batch",
    "ingest",
    "list_batches",
    "new_batch_id",
    "parse_openai_file",
    "parse_window",
    "purge",
    "recover_stale",
    "result_lines",
]
