"""Enqueue by task name, so the API never imports the worker or torch.

The broker message carries only the job id, and is sent after the job row is
committed: a job exists once its row does.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

from celery import Celery

from core import broker
from core.settings import Settings

broker.register()

GENERATE_TASK = "genq.generate"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The one Celery configuration, shared by the API's producer and the worker."""
    broker_url = settings.resolved_broker_url
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        # A worker reconnects to a broker that went away, however long it takes.
        "broker_connection_max_retries": None,
        "task_default_queue": settings.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(settings.task_time_limit_s - 30, 1),
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
    }
    if not broker_url.startswith("sqla+"):
        # Longer than the task time limit, so a running task is not redelivered.
        config["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout_s}
    return config


def make_celery(settings: Settings, *, name: str = "genq") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


class JobQueue(Protocol):
    """Where job ids go once their rows are committed."""

    def enqueue(self, job_id: str) -> None: ...

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        ...

    def depth(self) -> int:
        """Messages waiting in the queue (0 if the broker lost the queue)."""
        ...


class CeleryQueue:
    """Sends ``genq.generate(job_id)`` through the broker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app = make_celery(settings, name="genq-producer")

    def enqueue(self, job_id: str) -> None:
        self._app.send_task(GENERATE_TASK, args=[job_id], queue=self._settings.queue)

    def ping(self) -> None:
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def depth(self) -> int:
        with self._app.connection_for_read() as conn, conn.channel() as channel:
            try:
                declared = channel.queue_declare(queue=self._settings.queue, passive=True)
            except channel.connection.channel_errors:
                return 0
            return int(declared.message_count)


@functools.cache
def _queue_for(settings: Settings) -> CeleryQueue:
    return CeleryQueue(settings)


def get_queue(settings: Settings) -> JobQueue:
    """The process's queue for these settings."""
    return _queue_for(settings)
