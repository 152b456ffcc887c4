"""Prometheus metrics computed from SQL at scrape time.

SQL is the source of truth, so every API process answers ``/metrics`` with the
same cluster-wide figures: nothing is counted in process memory. A
:class:`ClusterCollector` runs a handful of aggregate queries per scrape.

The two histograms (queue wait, run time) are *sliding-window* histograms: each
scrape counts the jobs that finished in the last :data:`HISTOGRAM_WINDOW_S`
seconds, with the bucket counts made by ``SUM(CASE WHEN seconds <= le ...)`` in
SQL. Their buckets can go down between scrapes, so read them as they are (for
example ``histogram_quantile(0.95, sum by (le) (genq_job_run_seconds_bucket))``),
never through ``rate()``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from core import workers
from core.db import get_sessionmaker
from core.models import Job, utcnow
from core.queue import JobQueue, queues_carrying
from core.settings import Settings
from core.status import JobStatus

log = logging.getLogger(__name__)

HISTOGRAM_WINDOW_S = 15 * 60
"""The histograms count jobs that finished this recently."""
RATE_WINDOW_S = 60
"""Tokens per second are the completion tokens of jobs finished this recently, over it."""
MAX_QUEUES = 200
"""At most this many queues are asked for their depth per scrape."""

QUEUE_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_TIME_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclasses.dataclass(frozen=True)
class WindowHistogram:
    """Cumulative bucket counts (one per upper bound, then +Inf) and the sum."""

    buckets: list[tuple[str, float]]
    total: float


def _seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, as SQL (SQLite stores datetimes as text)."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def window_histograms(
    session: Session,
    *,
    start: Any,
    end: Any,
    bounds: Sequence[float],
    since: dt.datetime,
) -> dict[str, WindowHistogram]:
    """Per model, a histogram of ``end - start`` over jobs finished since ``since``."""
    seconds = _seconds_between(session, start, end)
    columns = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in bounds]
    query = (
        select(Job.model, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
        .where(Job.finished_at >= since, start.is_not(None), end.is_not(None))
        .group_by(Job.model)
    )
    result: dict[str, WindowHistogram] = {}
    for model, count, total, *cumulative in session.execute(query):
        buckets = [(_le(b), float(c or 0)) for b, c in zip(bounds, cumulative, strict=True)]
        buckets.append(("+Inf", float(count)))
        result[str(model)] = WindowHistogram(buckets=buckets, total=float(total or 0.0))
    return result


def _le(bound: float) -> str:
    return repr(float(bound))


def jobs_by_status(session: Session) -> dict[tuple[str, str], int]:
    """How many jobs there are in each (status, model)."""
    rows = session.execute(
        select(Job.status, Job.model, func.count()).group_by(Job.status, Job.model)
    )
    return {(str(status), str(model)): int(n) for status, model, n in rows}


def oldest_queued(session: Session, now: dt.datetime) -> dict[str, float]:
    """Per model, the age in seconds of its oldest queued job."""
    rows = session.execute(
        select(Job.model, func.min(Job.created_at))
        .where(Job.status == JobStatus.QUEUED)
        .group_by(Job.model)
    )
    result: dict[str, float] = {}
    for model, created in rows:
        if created is not None:
            if created.tzinfo is None:  # SQLite drops the zone in aggregates
                created = created.replace(tzinfo=dt.UTC)
            result[str(model)] = max((now - created).total_seconds(), 0.0)
    return result


def queues_to_measure(session: Session, settings: Settings) -> list[str]:
    """Every live worker's queues, and the queue of each (model, priority) with queued jobs."""
    names: set[str] = set()
    for worker in workers.live_workers(session, within_s=alive_within_s(settings)):
        names.update(worker.queues or [])
    queued = session.execute(
        select(Job.model, Job.priority).where(Job.status == JobStatus.QUEUED).distinct()
    )
    for model, priority in queued:
        names.update(queues_carrying(settings.queue, str(model), str(priority)))
    return sorted(names)[:MAX_QUEUES]


def alive_within_s(settings: Settings) -> float:
    """A worker is alive if it heart-beat within three intervals."""
    return settings.worker_heartbeat_s * 3


class ClusterCollector:
    """A prometheus-client collector that queries SQL (and the broker) when scraped."""

    def __init__(self, settings: Settings, queue: JobQueue | None) -> None:
        self._settings = settings
        self._queue = queue

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not query the database."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The metric families, from one short read-only session."""
        now = utcnow()
        with get_sessionmaker(self._settings.resolved_database_url)() as session:
            families = list(self._from_sql(session, now))
            queues = queues_to_measure(session, self._settings)
        yield from families
        yield from self._queue_depths(queues)

    def _from_sql(self, session: Session, now: dt.datetime) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "genq_jobs", "Jobs in the database, by status and model.", labels=["status", "model"]
        )
        for (status, model), n in sorted(jobs_by_status(session).items()):
            jobs.add_metric([status, model], n)
        yield jobs

        oldest = GaugeMetricFamily(
            "genq_oldest_queued_job_age_seconds",
            "Age of the oldest queued job, by model.",
            labels=["model"],
        )
        for model, age in sorted(oldest_queued(session, now).items()):
            oldest.add_metric([model], age)
        yield oldest

        live = workers.live_workers(session, within_s=alive_within_s(self._settings))
        alive = GaugeMetricFamily(
            "genq_workers_alive",
            "Worker processes that heart-beat within 3 heartbeat intervals, by model.",
            labels=["model"],
        )
        in_flight = GaugeMetricFamily(
            "genq_worker_jobs_in_flight",
            "Jobs running on live workers, by model.",
            labels=["model"],
        )
        tokens = CounterMetricFamily(
            "genq_tokens_generated",
            "Tokens generated by the live workers since they started, by model "
            "(drops when a worker goes away).",
            labels=["model"],
        )
        per_model: dict[str, list[int]] = {}
        for worker in live:
            figures = per_model.setdefault(worker.model, [0, 0, 0])
            figures[0] += 1
            figures[1] += worker.in_flight or 0
            figures[2] += worker.tokens_generated or 0
        for model, (count, running, generated) in sorted(per_model.items()):
            alive.add_metric([model], count)
            in_flight.add_metric([model], running)
            tokens.add_metric([model], generated)
        yield from (alive, in_flight, tokens)

        since = now - dt.timedelta(seconds=RATE_WINDOW_S)
        recent = session.scalar(
            select(func.coalesce(func.sum(Job.completion_tokens), 0)).where(
                Job.finished_at >= since
            )
        )
        yield GaugeMetricFamily(
            "genq_generation_tokens_per_second",
            f"Completion tokens of jobs finished in the last {RATE_WINDOW_S} s, per second.",
            value=float(recent or 0) / RATE_WINDOW_S,
        )

        window = now - dt.timedelta(seconds=HISTOGRAM_WINDOW_S)
        for name, doc, start, end, bounds in (
            ("genq_job_queue_wait_seconds", "created to started", Job.created_at,
             Job.started_at, QUEUE_WAIT_BUCKETS),
            ("genq_job_run_seconds", "started to finished", Job.started_at,
             Job.finished_at, RUN_TIME_BUCKETS),
        ):  # fmt: skip
            family = HistogramMetricFamily(
                name,
                f"Seconds from {doc}, over jobs finished in the last {HISTOGRAM_WINDOW_S} s "
                "(a sliding window: do not rate() it).",
                labels=["model"],
            )
            histograms = window_histograms(
                session, start=start, end=end, bounds=bounds, since=window
            )
            for model, hist in sorted(histograms.items()):
                family.add_metric([model], hist.buckets, hist.total)
            yield family

    def _queue_depths(self, queues: list[str]) -> Iterator[Metric]:
        if self._queue is None:
            return
        depth = GaugeMetricFamily(
            "genq_queue_depth", "Messages waiting in each broker queue.", labels=["queue"]
        )
        up = 1
        for name in queues:
            try:
                depth.add_metric([name], self._queue.depth(name))
            except Exception:  # the broker is down: say so, keep the SQL figures
                log.warning("could not read the depth of queue %s", name, exc_info=True)
                up = 0
                break
        yield depth
        yield GaugeMetricFamily(
            "genq_broker_up", "Whether the broker answered the queue-depth queries.", value=up
        )


def make_registry(settings: Settings, queue: JobQueue | None) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding the cluster collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(settings, queue))
    return registry
