"""One settings class, read from GENQ_* environment variables when first used.

Nothing reads the environment at import: call :func:`get_settings`. With nothing
set, genq runs embedded: a SQLite database and a SQLite-backed broker under
``GENQ_DATA_DIR`` (``./.genq``), so no server is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DType = Literal["auto", "float32", "bfloat16", "float16"]
Allocator = Literal["auto", "jemalloc", "system"]
Fp32Products = Literal["packed", "model"]


class Settings(BaseSettings):
    """Every knob genq has; each field is the variable ``GENQ_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", frozen=True)

    @field_validator("models", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

    data_dir: Path = Path(".genq")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/genq.db"
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker URL; default sqla+sqlite:///<data_dir>/broker.db"
    )
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = Field(default=None, description="the key `genq submit` sends")

    # The model a worker serves (and the default for jobs) and how it runs.
    model: str = "gpt2"
    model_name: str | None = Field(
        default=None,
        description="the id the model is served as (queues, /v1/models, metrics); "
        "default: GENQ_MODEL, a local directory as its absolute path",
    )
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="more models jobs may ask for (comma-separated), beside those workers serve",
    )
    device: str = "auto"
    dtype: DType = "auto"
    torch_threads: int = Field(default=0, ge=0, description="0: one per physical core")
    share_cores: bool = Field(
        default=True,
        description="before each forward, use no more torch threads than the CPUs other"
        " processes left idle (false: always GENQ_TORCH_THREADS)",
    )
    compile_attention: bool = Field(
        default=True,
        description="bf16/fp16 on a CPU: compile the decode step's attention with"
        " torch.compile (needs a C++ compiler; the worker serves uncompiled meanwhile and"
        " where it cannot)",
    )
    fp32_products: Fp32Products = Field(
        default="packed",
        description="fp32 on a CPU, GPT-2 and Llama: the weights packed once for oneDNN's"
        " kernels (packed; logits differ from the model's own in the last bits), or the"
        " model's own products, the kernels generate calls (model)",
    )
    allocator: Allocator = Field(
        default="system",
        description="the worker's malloc: the C library's (system), jemalloc where installed"
        " (auto), or jemalloc or an error; see cli/allocator.py",
    )
    max_batch_size: int = Field(default=64, ge=1, le=1024)
    max_tokens_in_flight: int = Field(default=65_536, ge=1)
    default_max_new_tokens: int = Field(default=50, ge=1)
    fast_decode: bool = Field(
        default=True,
        description="decode GPT-2 and Llama models with a step written for them (false: the"
        " model's own forward, for every model)",
    )
    express_max_new_tokens: int = Field(
        default=16,
        ge=0,
        le=256,
        description="requests of at most this many new tokens skip a busy batch in small"
        " steps of their own, and (read by the API) a queue's backlog (0: off)",
    )

    # The worker process.
    worker_concurrency: int = Field(default=0, ge=0, description="0: max_batch_size + 8")
    jobs_per_message: int = Field(
        default=8, ge=1, le=256, description="jobs submitted together go this many per message"
    )
    worker_events: bool = Field(default=True, description="Celery task events, for Flower")
    bulk_share: float = Field(
        default=0.15,
        gt=0,
        le=1,
        description="while web apps' jobs (high, express) are about, other jobs' claim rounds"
        " and store rounds each take at most this share of a worker's time (1: no pauses)",
    )
    task_time_limit_s: int = Field(default=3600, ge=10)
    progress_interval_s: float = Field(default=1.0, gt=0)
    queue: str = "genq"

    # Delivery guarantees: leases, attempts, the sweeper, shutdown.
    lease_s: float = Field(default=60.0, gt=0, description="a running job's lease; renewed")
    max_attempts: int = Field(default=3, ge=1, description="then the job fails (poison)")
    requeue_after_s: float = Field(
        default=300.0, gt=0, description="re-send a queued job whose message may be lost"
    )
    sweep_interval_s: float = Field(default=10.0, gt=0)
    ingest_stale_s: float = Field(
        default=120.0,
        gt=0,
        description="a validating batch whose ingest made no progress this long is failed",
    )
    feed_ahead: int = Field(
        default=2048, ge=1, description="a batch's job ids kept in each queue per live worker"
    )
    feed_interval_s: float = Field(default=0.5, gt=0, description="how often queues are topped up")
    worker_heartbeat_s: float = Field(default=5.0, gt=0, description="workers register this often")
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="then jobs are handed back")
    db_retry_s: float = Field(default=120.0, ge=0, description="how long to retry the database")
    retention_days: float = Field(default=30.0, gt=0, description="finished jobs kept this long")

    # The API's edge.
    require_auth: bool = True
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    # Per-owner limits (core.quotas): a 429 with Retry-After past them; 0 turns one off.
    quota_active_jobs: int = Field(
        default=1_000_000, ge=0, description="queued + running jobs per owner"
    )
    quota_file_bytes: int = Field(
        default=50 * 1024**3, ge=0, description="bytes of uploaded files per owner"
    )
    quota_requests_per_s: float = Field(
        default=1000.0, ge=0, description="API requests a second per owner, per API process"
    )
    quota_request_burst: int = Field(default=10_000, ge=1, description="requests at once above it")
    quota_streams: int = Field(
        default=64, ge=0, description="open event streams + waiting completions per owner"
    )
    quota_auth_failures_per_s: float = Field(
        default=0.2, ge=0, description="wrong API keys a second per client address, per process"
    )
    quota_auth_failure_burst: int = Field(
        default=20, ge=1, description="wrong API keys at once above that rate"
    )

    # Bulk generation: files, batches, /v1/completions (core.batches, docs/batch.md).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024, description="per upload")
    max_batch_lines: int = Field(default=50_000, ge=1, description="requests per batch")
    completion_wait_s: float = Field(
        default=60.0,
        ge=0,
        description="POST /v1/completions waits this long, then answers 202 (a stream ends"
        " after this long without new text)",
    )

    # Webhooks (core.webhooks, docs/webhooks.md).
    webhook_secret: str | None = Field(
        default=None, description="signs webhooks of owners without a key secret (auth off)"
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="one attempt's whole time: resolve, connect, send, answer"
    )
    webhook_allow_networks: str = Field(
        default="",
        description="CIDRs webhooks may go to beside public addresses (e.g. 127.0.0.0/8)",
    )
    webhook_senders: int = Field(default=16, ge=1, le=256, description="POSTs at once per worker")
    webhook_per_host: int = Field(
        default=2, ge=1, description="POSTs at once to one host; more wait (not a sender each)"
    )
    webhook_max_age_s: float = Field(
        default=86_400.0, gt=0, description="retry a failing webhook this long, then give up"
    )
    webhook_backoff_base_s: float = Field(default=5.0, gt=0, description="first retry's wait")
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0, description="longest retry wait")
    webhook_poll_s: float = Field(default=1.0, gt=0, description="how often due ones are sent")

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        from core.egress import parse_networks

        parse_networks(value)  # a bad entry is an error at start, naming it
        return value

    @property
    def webhook_allow(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """``webhook_allow_networks`` parsed (core.egress)."""
        from core.egress import parse_networks

        return parse_networks(self.webhook_allow_networks)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'genq.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def model_id(self) -> str:
        """The one id of the served model: ``GENQ_MODEL_NAME``, else :func:`model_id`."""
        return self.model_name or model_id(self.model)

    @property
    def resolved_worker_concurrency(self) -> int:
        return self.worker_concurrency or self.max_batch_size + 8

    @property
    def visibility_timeout_s(self) -> int:
        """Longer than the task time limit, so a running task is never redelivered."""
        return self.task_time_limit_s * 2


def model_id(spec: str) -> str:
    """One id per model, however it is spelt: a local directory (a path that exists, or
    one written as a path) becomes its absolute, resolved path, so ``../models/m`` and
    ``/srv/models/m`` share queues, metrics labels and an entry in /v1/models; a hub
    name stays as it is (transformers, too, prefers a local directory of that name)."""
    if spec == "fake" or spec.startswith("fake:"):
        return spec
    try:
        path = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) or path.is_dir():
            return str(path.resolve())
    except (OSError, RuntimeError, ValueError):  # a caller's name no path can be
        return spec
    return spec


def served_model(spelt: str, served: Collection[str]) -> str | None:
    """The served model a caller's ``spelt`` names, or None: a served id as it is,
    else a spelling :func:`model_id` resolves to a served id (``../models/m`` for the
    served ``/srv/models/m``). The resolved path is only compared, never shown: an
    error names ``spelt`` as sent, and a path resolving anywhere else (``/proc/self/cwd``)
    names no model rather than telling the caller where it leads."""
    if spelt in served:
        return spelt
    resolved = model_id(spelt)
    return resolved if resolved in served else None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
