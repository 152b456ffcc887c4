"""The OpenAI batch object, with request counts and usage from the job rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.batches.results import counts
from core.models import Batch
from core.openai_format import error_list, unix


def batch_object(session: Session, batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object, with the request counts and usage from the job rows."""
    tally = counts(session, batch.id)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": error_list(batch.errors) if batch.errors else None,
        "input_file_id": batch.input_file_id or "",
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at),
        "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at),
        "failed_at": unix(batch.failed_at),
        "expired_at": unix(batch.expired_at),
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": tally.completed,
            "failed": tally.failed,
        },
        "usage": {
            "input_tokens": tally.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tally.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tally.prompt_tokens + tally.completion_tokens,
        },
        "metadata": batch.meta,
    }
