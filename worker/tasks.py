"""Celery tasks: thin translations from a message to a runtime call."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Reject

from core.queue import GENERATE_MANY_TASK, GENERATE_TASK
from worker import lifecycle
from worker.celery_app import app
from worker.runtime import HANDED_BACK, DrainingError


@app.task(name=GENERATE_TASK, bind=True, acks_late=True, ignore_result=True)
def generate(self: Any, job_id: str) -> str:
    """Generate one job by id; the result lands in the job's row."""
    return _run(self, [job_id])[job_id]


@app.task(name=GENERATE_MANY_TASK, bind=True, acks_late=True, ignore_result=True)
def generate_many(self: Any, job_ids: list[str]) -> dict[str, str]:
    """Generate jobs submitted together; each result lands in its job's row."""
    return _run(self, job_ids)


def _run(task: Any, job_ids: list[str]) -> dict[str, str]:
    try:
        statuses = lifecycle.get_runtime().run_jobs(
            job_ids,
            worker=task.request.hostname or "worker",
            queue=(task.request.delivery_info or {}).get("routing_key"),
        )
    except DrainingError:
        raise Reject("worker shutting down", requeue=True) from None
    if HANDED_BACK in statuses.values():
        # The worker is stopping and gave jobs back to the queue: so goes their
        # message (a redelivery skips the jobs of it that did finish).
        raise Reject("worker shutting down: jobs handed back", requeue=True)
    return statuses
