"""Enqueue by task name, so the API never imports the worker or torch.

A broker message carries only job ids, and is sent after the job rows are
committed: a job exists once its row does. One job submitted alone is one
``genq.generate`` message; jobs submitted together (a bulk submit, a batch, the
sweeper's re-sends) go as ``genq.generate_many`` messages of up to
``GENQ_JOBS_PER_MESSAGE`` ids of one model and priority, so the worker claims and
stores them in one transaction each instead of one per job.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

from celery import Celery

from core import broker, db
from core.express import EXPRESS_ROWS
from core.settings import Settings

broker.register()

GENERATE_TASK = "genq.generate"
GENERATE_MANY_TASK = "genq.generate_many"
JOBS_HEADER = "genq_jobs"
"""A message header: how many job ids the message carries (the sweeper counts them)."""
READ_PAGE = 1000

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
EXPRESS = "express"
"""The queue of short ``normal`` jobs (:mod:`core.express`): read right after ``high``."""
CONSUME_ORDER: tuple[str, ...] = ("high", EXPRESS, "normal", "low")


def model_key(model: str) -> str:
    """A queue-safe name for a model: readable, and unique through a short hash."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", model).strip("-")[-40:] or "model"
    return f"{slug}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"


def queue_name(prefix: str, model: str, lane: str) -> str:
    """The queue for jobs of ``model`` in ``lane`` (a priority, or ``express``): one
    queue per model and lane."""
    return f"{prefix}.{model_key(model)}.{lane}"


def queues_for(prefix: str, model: str) -> list[str]:
    """A worker's queues for ``model``, in the order it consumes them: high, then short
    jobs of normal priority, then normal, then low."""
    return [queue_name(prefix, model, lane) for lane in CONSUME_ORDER]


def lane_rank(queue: str | None) -> int:
    """Where the queue named ``queue`` comes in :data:`CONSUME_ORDER` (0 first); a
    name of no known lane ranks as ``normal``."""
    lane = (queue or "").rpartition(".")[2]
    return CONSUME_ORDER.index(lane if lane in CONSUME_ORDER else "normal")


def queues_carrying(prefix: str, model: str, priority: str) -> list[str]:
    """The queues that may hold the messages of ``model``'s jobs of ``priority``."""
    lanes = [EXPRESS, priority] if priority == "normal" else [priority]
    return [queue_name(prefix, model, lane) for lane in lanes]


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
        config["broker_transport_options"] = {
            # Longer than the task time limit, so a running task is not redelivered.
            "visibility_timeout": settings.visibility_timeout_s,
            # A worker polls its queues in the order given (high, express, normal,
            # low) instead of round robin, so priorities hold.
            "queue_order_strategy": "priority",
            # On Redis the last few places of a worker's prefetch are for a web app's
            # messages (core.broker): a batch's messages never fill them all.
            "urgent_prefetch": urgent_prefetch(settings),
            "urgent_lanes": URGENT_LANES,
            # A command whose reply a cut link lost fails (and is retried) instead of
            # waiting for the kernel's two-hour keepalive: the probes genq's database
            # connections make (core.db.client_limits).
            "socket_connect_timeout": db.CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
            "socket_keepalive_options": broker_keepalive_options(),
        }
    return config


def broker_keepalive_options() -> dict[int, int]:
    """The TCP options of genq's Redis connections, those this platform has."""
    wanted = {
        "TCP_KEEPIDLE": db.TCP_KEEPALIVE_IDLE_S,
        "TCP_KEEPINTVL": db.TCP_KEEPALIVE_INTERVAL_S,
        "TCP_KEEPCNT": db.TCP_KEEPALIVE_COUNT,
    }
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


URGENT_LANES = ("high", EXPRESS)
"""The queues of a web app's jobs: a worker keeps prefetch places and job slots for
them, and their messages have their own claim and store rounds (worker.runtime)."""
URGENT_RANK = max(CONSUME_ORDER.index(lane) for lane in URGENT_LANES)
"""The :func:`lane_rank` of the last urgent lane: a queue of this rank or better is urgent."""


def urgent_prefetch(settings: Settings) -> int:
    """The prefetch places (and task threads) a worker keeps for its urgent queues:
    ``EXPRESS_ROWS`` on Redis, where the transport can keep them (core.broker)."""
    return EXPRESS_ROWS if settings.resolved_broker_url.startswith(("redis://", "rediss://")) else 0


def make_celery(settings: Settings, *, name: str = "genq") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a job's message goes: the queue of its model and priority, or of its
    model's short jobs (``express``, :mod:`core.express`)."""

    job_id: str
    model: str
    priority: str = "normal"
    express: bool = False

    @property
    def lane(self) -> str:
        """The last part of the queue's name."""
        return EXPRESS if self.express else self.priority


def group_routes(routes: Iterable[Route], size: int) -> Iterator[tuple[str, str, list[str]]]:
    """``(model, lane, ids)`` groups of at most ``size`` ids, in the order given within
    each model and lane."""
    by_queue: dict[tuple[str, str], list[str]] = {}
    for route in routes:
        by_queue.setdefault((route.model, route.lane), []).append(route.job_id)
    for (model, lane), ids in by_queue.items():
        for start in range(0, len(ids), size):
            yield model, lane, ids[start : start + size]


class JobQueue(Protocol):
    """Where job ids go once their rows are committed."""

    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        """Send a job id to the queue of its model (default: the configured one)."""
        ...

    def enqueue_many(self, routes: Sequence[Route]) -> None:
        """Send many job ids, a few per message (see the module's docstring)."""
        ...

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        ...

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (0 if the broker lost the queue)."""
        ...

    def queued_jobs(self, queue: str) -> int:
        """Job ids in the messages waiting in ``queue`` (0 if the broker lost it),
        or an upper bound where the broker cannot say."""
        ...


class CeleryQueue:
    """Sends ``genq.generate(job_id)`` and ``genq.generate_many(job_ids)`` through the broker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app = make_celery(settings, name="genq-producer")

    def enqueue(self, job_id: str, *, model: str | None = None, priority: str = "normal") -> None:
        queue = queue_name(self._settings.queue, model or self._settings.model_id, priority)
        self._app.send_task(GENERATE_TASK, args=[job_id], queue=queue, headers={JOBS_HEADER: 1})

    def enqueue_many(self, routes: Sequence[Route]) -> None:
        size = self._settings.jobs_per_message
        with self._app.producer_or_acquire() as producer:  # one connection for them all
            for model, lane, ids in group_routes(routes, size):
                queue = queue_name(self._settings.queue, model, lane)
                self._app.send_task(
                    GENERATE_MANY_TASK,
                    args=[ids],
                    queue=queue,
                    producer=producer,
                    headers={JOBS_HEADER: len(ids)},
                )

    def ping(self) -> None:
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def depth(self, queue: str) -> int:
        with self._app.connection_for_read() as conn, conn.channel() as channel:
            try:
                declared = channel.queue_declare(queue=queue, passive=True)
            except channel.connection.channel_errors:  # (py-amqp revives the channel)
                return 0
            return int(declared.message_count)

    def queued_jobs(self, queue: str) -> int:
        """On Redis, the job ids of every waiting message, read a page at a time
        (messages pushed or popped meanwhile may be counted once too often or not
        at all: the sweeper only re-sends jobs sent long ago, so a miscount costs a
        harmless duplicate or one sweep's delay). Other brokers only say how many
        messages wait: that times the most ids a message holds."""
        with self._app.connection_for_read() as conn, conn.channel() as channel:
            if conn.transport.driver_type != "redis":
                return self.depth(queue) * self._settings.jobs_per_message
            keys = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps]
            total = 0
            for key in keys:
                start = 0
                while page := channel.client.lrange(key, start, start + READ_PAGE - 1):
                    total += sum(_jobs_in(raw) for raw in page)
                    start += len(page)
            return total


def _jobs_in(raw: bytes) -> int:
    """The job ids a raw kombu message on Redis carries (1 if it does not say)."""
    try:
        count = json.loads(raw)["headers"].get(JOBS_HEADER, 1)
    except (ValueError, KeyError, TypeError, AttributeError):
        return 1
    return count if isinstance(count, int) and count > 0 else 1


@functools.cache
def _queue_for(settings: Settings) -> CeleryQueue:
    return CeleryQueue(settings)


def get_queue(settings: Settings) -> JobQueue:
    """The process's queue for these settings."""
    return _queue_for(settings)
