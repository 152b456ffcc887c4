"""Pydantic request and response models shared by the API and the worker.

Generation parameters use transformers' names and sit at the top level of a job
request, e.g. ``{"prompt": "...", "max_new_tokens": 40, "do_sample": false}``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    UrlConstraints,
    ValidationInfo,
    field_validator,
)

from core.chat import ChatMessage, Messages, check_conversation
from core.logprobs import TokenLogprob
from core.models import Job, WebhookDelivery
from core.status import JobStatus
from core.structured import ResponseFormat, UnsupportedSchemaError, grammar_for

MAX_NEW_TOKENS_LIMIT = 4096
MAX_PROMPT_CHARS = 200_000
MAX_STOP_STRINGS = 8
MAX_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
# Smallest temperature accepted when sampling: logits divided by less overflow float32
# to infinity (inf - inf is NaN in the softmax), so such a value can only fail.
MIN_TEMPERATURE = 1e-3
# Smallest repetition penalty: dividing a logit by less overflows the same way.
MIN_REPETITION_PENALTY = 1e-2

FinishReason = Literal["length", "eos", "stop", "cancelled"]
Priority = Literal["high", "normal", "low"]
CallbackUrl = Annotated[
    AnyHttpUrl, UrlConstraints(max_length=2048, allowed_schemes=["http", "https"])
]
JOB_FIELDS = frozenset({"prompt", "messages", "model", "priority", "callback_url"})
StopString = Annotated[str, Field(min_length=1, max_length=256)]


class GenerationParams(BaseModel):
    """What to generate, with transformers' names and defaults.

    Omitted parameters mean greedy decoding with ``max_new_tokens`` taken from
    settings (50 by default). ``max_length`` (prompt plus new tokens) is accepted
    instead of ``max_new_tokens`` so the classic
    ``generate(max_length=50, num_beams=5, early_stopping=True)`` is expressible.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    max_length: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT * 4)
    do_sample: bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_k: int = Field(default=50, ge=0, le=100_000)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    num_beams: int = Field(default=1, ge=1, le=MAX_SEQUENCES)
    early_stopping: bool | Literal["never"] = False
    length_penalty: float = Field(default=1.0, ge=-10.0, le=10.0)
    repetition_penalty: float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=100.0)
    no_repeat_ngram_size: int = Field(default=0, ge=0, le=64)
    num_return_sequences: int = Field(default=1, ge=1, le=MAX_SEQUENCES)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    response_format: ResponseFormat | None = Field(
        default=None, description="OpenAI's json_object / json_schema: constrained output"
    )
    logprobs: bool = Field(default=False, description="return each token's log-probability")
    top_logprobs: int = Field(
        default=0, ge=0, le=MAX_TOP_LOGPROBS, description="and the N likeliest at each position"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    # Cross-field rules are field validators on the later field, so a 422 names it.
    @field_validator("temperature")
    @classmethod
    def _temperature_for_sampling(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("do_sample") and value < MIN_TEMPERATURE:
            raise ValueError(
                f"must be >= {MIN_TEMPERATURE} when do_sample is true"
                " (use do_sample false for greedy)"
            )
        return value

    @field_validator("num_return_sequences")
    @classmethod
    def _sequences_need_beams_or_sampling(cls, value: int, info: ValidationInfo) -> int:
        if not info.data.get("do_sample") and value > info.data.get("num_beams", 1):
            raise ValueError(
                "must be <= num_beams without sampling (greedy decoding yields one sequence)"
            )
        beams = info.data.get("num_beams", 1)
        if beams > 1 and value > beams:
            raise ValueError("must be <= num_beams with beam search")
        return value

    @field_validator("max_length")
    @classmethod
    def _one_length(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("max_new_tokens") is not None:
            raise ValueError("give max_new_tokens or max_length, not both")
        return value

    @field_validator("response_format")
    @classmethod
    def _compilable(cls, value: ResponseFormat | None, info: ValidationInfo) -> object:
        if value is not None and info.data.get("num_beams", 1) > 1:
            raise ValueError("is not supported with num_beams > 1")
        try:
            grammar_for(value)  # compiled once per schema (cached); the worker does it again
        except UnsupportedSchemaError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs_without_beams(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("num_beams", 1) > 1:
            raise ValueError("is not supported with num_beams > 1")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")
        return value

    @property
    def uses_beams(self) -> bool:
        """Beam search: the request owns ``num_beams`` rows of the batch."""
        return self.num_beams > 1

    def with_defaults(self, default_max_new_tokens: int) -> GenerationParams:
        """Fill ``max_new_tokens`` from settings when neither length is given."""
        if self.max_new_tokens is None and self.max_length is None:
            return self.model_copy(update={"max_new_tokens": default_max_new_tokens})
        return self


class JobCreate(GenerationParams):
    """Body of ``POST /v1/jobs``: a prompt (or chat messages), an optional model, and
    the parameters."""

    # messages first: the prompt's validator sees them (a 422 then names "prompt").
    messages: Messages | None = Field(
        default=None,
        description="instead of prompt: OpenAI's chat messages, rendered with the model's "
        "chat template; the output is the assistant's reply",
    )
    prompt: str | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPT_CHARS, validate_default=True
    )
    model: str | None = Field(default=None, min_length=1, max_length=512)
    priority: Priority = Field(
        default="normal", description="high jobs start before normal ones, normal before low"
    )
    callback_url: CallbackUrl | None = Field(
        default=None, description="POSTed the job, signed, when it finishes, fails or is cancelled"
    )

    @field_validator("messages")
    @classmethod
    def _answerable(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        return check_conversation(value) if value is not None else None

    @field_validator("prompt")
    @classmethod
    def _prompt_or_messages(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("prompt must not be blank")
        if "messages" not in info.data:  # the messages were invalid: that error says enough
            return value
        messages = info.data["messages"]
        if value is None and messages is None:
            raise ValueError("give prompt (or chat messages)")
        if value is not None and messages is not None:
            raise ValueError("give prompt or messages, not both")
        return value

    def params(self) -> GenerationParams:
        """The generation parameters alone, without prompt and model."""
        return GenerationParams.model_validate(
            self.model_dump(exclude=set(JOB_FIELDS), exclude_unset=True)
        )


MAX_BULK_JOBS = 10_000


class JobBulkCreate(BaseModel):
    """Body of ``POST /v1/jobs/bulk``: many jobs, accepted together or not at all."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobCreate] = Field(min_length=1, max_length=MAX_BULK_JOBS)


class Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class JobError(BaseModel):
    code: str
    message: str


class Reproducibility(BaseModel):
    """What is needed to run a job again and get the same tokens."""

    model_revision: str | None = None
    seed: int | None = None
    torch_version: str | None = None
    transformers_version: str | None = None
    dtype: str | None = Field(
        default=None, description="the model's dtype (bfloat16 tokens can differ from float32's)"
    )
    products: str | None = Field(
        default=None,
        description="the matrix products' kernels: the model's own (model, those generate"
        " calls) or on weights packed once for oneDNN (packed: the same sums in another"
        " order, so the last bits of the scores can differ)",
    )


class WebhookStatus(BaseModel):
    """How the job's webhook delivery is going (docs/webhooks.md)."""

    id: str
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: dt.datetime | None = None

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> WebhookStatus:
        return cls(
            id=row.id,
            event=row.event,
            status=row.status,
            attempts=row.attempts,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            delivered_at=row.delivered_at,
        )


class JobRead(BaseModel):
    """A job as the API returns it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    prompt: str = Field(description="a chat job's is empty until its worker renders it")
    messages: list[dict[str, Any]] | None = None
    model: str
    params: dict[str, Any]
    output: str | None = None
    outputs: list[str] | None = None
    finish_reason: FinishReason | None = None
    finish_reasons: list[FinishReason] | None = None
    logprobs: list[list[TokenLogprob]] | None = Field(
        default=None, description="per sequence, per token (when the job asked for logprobs)"
    )
    error: JobError | None = None
    usage: Usage
    attempts: int
    worker: str | None = None
    reproducibility: Reproducibility
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    priority: Priority = "normal"
    callback_url: str | None = None
    webhook: WebhookStatus | None = None

    @classmethod
    def from_job(cls, job: Job, webhook: WebhookDelivery | None = None) -> JobRead:
        """The API view of a job row (and its webhook delivery, read by the caller:
        this makes no query). While it runs, ``output`` is the partial text."""
        outputs = job.outputs
        reasons = job.finish_reasons
        return cls(
            id=job.id,
            status=job.status,
            prompt=job.prompt,
            messages=job.messages,
            model=job.model,
            params=job.params,
            output=outputs[0] if outputs else None,
            outputs=outputs,
            finish_reason=reasons[0] if reasons else None,
            finish_reasons=reasons,
            logprobs=job.logprobs,
            error=JobError(code=job.error_code, message=job.error_message or "")
            if job.error_code
            else None,
            usage=Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens),
            attempts=job.attempts,
            worker=job.worker,
            reproducibility=Reproducibility(
                model_revision=job.model_revision,
                seed=job.seed,
                torch_version=job.torch_version,
                transformers_version=job.transformers_version,
                dtype=job.dtype,
                products=job.products,
            ),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            batch_id=job.batch_id,
            custom_id=job.custom_id,
            priority=job.priority,
            callback_url=job.callback_url,
            webhook=WebhookStatus.from_row(webhook) if webhook is not None else None,
        )


class JobsCreated(BaseModel):
    """The jobs a bulk submit queued, in the order they were given."""

    object: Literal["list"] = "list"
    data: list[JobRead]


class JobList(BaseModel):
    """One page of jobs, newest first; pass ``next_after`` as ``after`` for the next."""

    object: Literal["list"] = "list"
    data: list[JobRead]
    has_more: bool
    next_after: str | None = None
