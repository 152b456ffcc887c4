"""Typed ORM tables. The ``job`` row is the source of truth for every job."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
    literal_column,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.status import BatchStatus, JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use core.models.utcnow()")
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class JobStatusType(TypeDecorator[JobStatus]):
    """A job status: stored as its text, read back as :class:`JobStatus`."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


class BatchStatusType(TypeDecorator[BatchStatus]):
    """A batch status: stored as its text, read back as :class:`BatchStatus`."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else BatchStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> BatchStatus | None:
        return None if value is None else BatchStatus(value)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


JOB_FILLFACTOR = 80
"""Percent of each page of the job table filled by inserts; the rest is for updates."""

LOOSE_ACTIVE = "batch_id IS NULL AND status IN ('queued', 'running')"
"""Queued or running and of no batch: the predicate of ``ix_job_owner_active``, which
a query must repeat as it is for SQLite to use the index (core.quotas)."""
UNSENT_JOBS = "status = 'queued' AND enqueued_at IS NULL"
"""Jobs not yet sent to the broker (only a batch's): the predicate of ``ix_job_unsent``,
which a query must repeat as it is for SQLite to use the index (core.feed)."""
SENT_JOBS = "status = 'queued' AND enqueued_at IS NOT NULL"
"""Queued jobs sent to the broker: the predicate of ``ix_job_sent``, which a query must
repeat as it is (constants, not parameters) for the index to serve it (core.delivery)."""
SUBMITTED_TOGETHER = "submission_id IS NOT NULL"
"""Jobs of a ``POST /v1/jobs/bulk``: the predicate of ``ix_job_submission_id``."""

LOCAL_OWNER = "local"
"""The owner of everything when authentication is off."""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class Job(Base):
    """One prompt to generate for, from queued to a final status."""

    __tablename__ = "job"
    __table_args__ = (
        # A batch's jobs not yet sent, per queue in id order: the feeder's next
        # ones (core.feed) are a short range scan however many were sent before,
        # and however many rows a batch still being validated has written.
        Index(
            "ix_job_unsent",
            "batch_id",
            "model",
            "priority",
            "id",
            postgresql_where=text(UNSENT_JOBS),
            sqlite_where=text(UNSENT_JOBS),
        ),
        # The queued jobs sent to the broker, per queue in id order: what the sweeper
        # counts and re-sends (core.delivery), however many unsent ones wait behind.
        Index(
            "ix_job_sent",
            "model",
            "priority",
            "id",
            postgresql_where=text(SENT_JOBS),
            sqlite_where=text(SENT_JOBS),
        ),
        # An owner's jobs by status (listing them filtered; and all of them, by owner).
        Index("ix_job_owner_status", "owner", "status"),
        # Jobs submitted together by one ``POST /v1/jobs/bulk`` (for its idempotency
        # key); the others, a batch's million, have no entry to write.
        Index(
            "ix_job_submission_id",
            "submission_id",
            postgresql_where=text(SUBMITTED_TOGETHER),
            sqlite_where=text(SUBMITTED_TOGETHER),
        ),
        # An owner's queued + running jobs of no batch: the part of the active-jobs
        # quota counted row by row (core.quotas; a batch's come from its counters).
        Index(
            "ix_job_owner_active",
            "owner",
            postgresql_where=text(LOOSE_ACTIVE),
            sqlite_where=text(LOOSE_ACTIVE),
        ),
        # Room on each page for heap-only (HOT) updates: see migration 0006.
        {"postgresql_with": {"fillfactor": JOB_FILLFACTOR}},
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Written only by core.jobstate's conditional UPDATEs, never assigned here.
    status: Mapped[JobStatus] = mapped_column(JobStatusType(), index=True, default=JobStatus.QUEUED)
    # A chat job's prompt is empty until its worker renders ``messages`` with the
    # model's chat template; the rendered prompt is stored with the result.
    prompt: Mapped[str] = mapped_column(Text)
    messages: Mapped[list[Any] | None] = mapped_column(JSON)
    model: Mapped[str] = mapped_column(String(512))
    params: Mapped[dict[str, Any]]

    outputs: Mapped[list[str] | None]
    finish_reasons: Mapped[list[str] | None]
    # Per sequence, per token: OpenAI's chat logprobs entries (when the job asked).
    logprobs: Mapped[list[Any] | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    owner: Mapped[str] = mapped_column(String(255), default=LOCAL_OWNER)  # ix_job_owner_status
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    callback_url: Mapped[str | None] = mapped_column(Text)

    # A request of a batch (core.batches): its batch and the caller's id for it.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batch.id"), index=True)
    custom_id: Mapped[str | None] = mapped_column(String(512))

    # Jobs submitted together by one ``POST /v1/jobs/bulk`` (for its idempotency key).
    submission_id: Mapped[str | None] = mapped_column(String(40))

    # Delivery: attempts counts claims that did not hand the job back; the lease
    # token names the one claim allowed to write; the lease expires unless renewed.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    # Not indexed, so a lease renewal is a HOT update (the sweeper finds expired
    # leases among the running jobs, through the status index).
    lease_expires_at: Mapped[dt.datetime | None]
    # When the job's message was last sent; NULL: a batch's job the feeder has not
    # sent yet (core.feed).
    enqueued_at: Mapped[dt.datetime | None]

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    # Reproducibility: what ran, with which seed.
    model_revision: Mapped[str | None] = mapped_column(String(128))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    torch_version: Mapped[str | None] = mapped_column(String(32))
    transformers_version: Mapped[str | None] = mapped_column(String(32))
    dtype: Mapped[str | None] = mapped_column(String(16))
    products: Mapped[str | None] = mapped_column(String(16))  # worker.engine.base.ModelInfo


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the secret (keys are high-entropy tokens)."""

    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    owner: Mapped[str] = mapped_column(String(255), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]
    # Webhooks: a default callback for the owner's jobs and batches, and the
    # secret their deliveries are signed with (HMAC-SHA256).
    callback_url: Mapped[str | None] = mapped_column(Text)
    webhook_secret: Mapped[str | None] = mapped_column(String(64))
    # Whether the key may submit priority "high" jobs (core.quotas.check_priority).
    high_priority: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Lock(Base):
    """A named cluster-wide lock with an expiry (the sweeper runs one at a time)."""

    __tablename__ = "lock"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[dt.datetime]


class File(Base):
    """An uploaded file (content in ``file_chunk``), or a batch's output or error file,
    whose content is made from the batch's job rows when read (``virtual``)."""

    __tablename__ = "file"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    # None for stored content; "output" or "error" for a batch's result files.
    virtual: Mapped[str | None] = mapped_column(String(16))
    batch_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class FileChunk(Base):
    """Up to 1 MiB of a stored file's content, in order of ``seq``."""

    __tablename__ = "file_chunk"

    file_id: Mapped[str] = mapped_column(
        ForeignKey("file.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    """A batch of requests (OpenAI's Batch API, or ``genq run``): one job per request."""

    __tablename__ = "batch"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    # Written only by core.batches.lifecycle (creation, then conditional UPDATEs).
    status: Mapped[BatchStatus] = mapped_column(BatchStatusType(), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(512))
    input_file_id: Mapped[str | None] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    callback_url: Mapped[str | None] = mapped_column(Text)
    # Requests that reached a final status, and the usage of those that succeeded,
    # as of the last fold of their batch_tally rows (core.tally): the counts are
    # these plus the batch's tally rows, read without scanning its jobs.
    completed_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # `genq run`: a hash of the input's path and content, so a re-run resumes.
    run_key: Mapped[str | None] = mapped_column(String(64), index=True)

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    in_progress_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
    finalizing_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]
    failed_at: Mapped[dt.datetime | None]
    expired_at: Mapped[dt.datetime | None]
    cancelling_at: Mapped[dt.datetime | None]
    cancelled_at: Mapped[dt.datetime | None]
    # While ``validating``: renewed by each chunk its ingest commits; NULL once the
    # sweeper has claimed a batch whose ingest stopped (core.batches.staging).
    ingest_heartbeat_at: Mapped[dt.datetime | None]
    # While ``validating``: the job rows its ingest has committed so far, counted
    # against the owner's active-jobs quota (core.quotas) until ``total`` is set.
    ingested: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class IdempotencyRecord(Base):
    """The object a request with an ``Idempotency-Key`` made, so a retry gets it again."""

    __tablename__ = "idempotency_record"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WorkerNode(Base):
    """A live worker process: what it serves, heart-beating while it runs."""

    __tablename__ = "worker_node"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(512), index=True)
    queues: Mapped[list[str]]
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    in_flight: Mapped[int] = mapped_column(Integer, default=0)
    tokens_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    # Whether the model's tokenizer has a chat template (chat requests need one).
    chat: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class WebhookDelivery(Base):
    """One webhook to send (an outbox row written with the final status), and how
    its attempts went. A dispatcher sends pending rows with backoff."""

    __tablename__ = "webhook_delivery"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    batch_id: Mapped[str | None] = mapped_column(String(40), index=True)
    event: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[dt.datetime | None]


class BatchTally(Base):
    """What one transaction finished of a batch (insert-only, so workers storing
    results never wait on the batch row); folded into the batch's counters by
    :func:`core.tally.fold`."""

    __tablename__ = "batch_tally"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    batch_id: Mapped[str] = mapped_column(String(40), index=True)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


def job_through(index: str, dialect: str) -> Any:
    """The job table as a statement's FROM, read through ``index`` on SQLite (``job
    INDEXED BY index``; plain ``job`` elsewhere). Left to itself SQLite's planner
    often takes another index whose terms match (``status = ?``, ``batch_id = ?``)
    and reads every row behind it; ``INDEXED BY`` fails the statement, rather than
    scan, should the index ever stop matching. Such a statement names its columns
    as text (:func:`job_column`), so SQLAlchemy adds no second ``job`` to its FROM,
    and repeats a partial index's predicate as it is written there: SQLite uses a
    partial index only for terms that match it, not through a parameter."""
    return text(f"job INDEXED BY {index}") if dialect == "sqlite" else Job.__table__


def job_column(name: str) -> Any:
    """A column of the job table as text, for statements FROM :func:`job_through`;
    typed as the model's column (so a datetime binds as genq stores it)."""
    return literal_column(f"job.{name}", type_=Job.__table__.c[name].type)
