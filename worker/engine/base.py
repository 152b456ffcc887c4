"""The engine protocol: what a Celery task may ask of the model-holding engine.

One engine per worker process owns the model and a scheduler. Tasks hand it
requests through :meth:`Engine.submit` and wait on the returned future; requests
in flight at the same moment share forward passes.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any, Literal, Protocol

from core.schemas import GenerationParams

FinishReason = Literal["length", "eos", "stop"]


# The code of a GenerationError that is not the job's fault (the engine could not
# place it, e.g. out of memory even in a smaller batch): the worker hands the job back
# to the queue instead of storing a failure.
REQUEUE = "requeue"


class GenerationError(Exception):
    """A job-level failure with a stable code, stored on the job as its error
    (except :data:`REQUEUE`, which sends the job back to the queue)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One job's generation: its prompt, parameters and the seed actually used."""

    id: str
    prompt: str
    params: GenerationParams
    seed: int
    # A chat request: ``{"role", "content"}`` messages the engine renders with the
    # model's chat template (``prompt`` is then ignored).
    messages: list[dict[str, str]] | None = None
    # The job's queue priority: ``low`` (bulk work, batches) never takes the express lane.
    priority: str = "normal"


@dataclasses.dataclass(frozen=True)
class Progress:
    """Tokens generated so far for a running request (first sequence's text), and
    the prompt's length in tokens (None where the engine does not know it)."""

    tokens: int
    text: str
    prompt_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What a finished (or aborted) request produced.

    ``outputs[i]`` is the continuation of sequence ``i`` without the prompt, such
    that ``prompt + outputs[i]`` equals the decoded full sequence (minus special
    tokens and anything from a stop string on). ``completion_tokens`` counts the
    tokens generated over all sequences, without padding.
    """

    outputs: list[str]
    finish_reasons: list[FinishReason]
    prompt_tokens: int
    completion_tokens: int
    aborted: bool = False
    # Per sequence, per generated token: OpenAI's chat logprobs entries (``token``,
    # ``logprob``, ``bytes``, ``top_logprobs``); None unless the request asked.
    logprobs: list[list[dict[str, Any]]] | None = None
    # A chat request's prompt as rendered by the chat template (None otherwise).
    prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The reproducibility record of the loaded model."""

    name: str
    revision: str
    torch_version: str
    transformers_version: str
    device: str
    dtype: str
    context_length: int
    chat_template: bool = False  # whether chat messages can be rendered
    # The matrix products: the model's own (``model``, the kernels ``generate`` calls),
    # on weights packed once for oneDNN (``packed``: the same sums in another order), or
    # ``none`` (the fake engine).
    products: str = "model"


class Engine(Protocol):
    """A model holder that batches requests from many tasks."""

    info: ModelInfo

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue a request; the future resolves to its result or a GenerationError."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request within a few decode steps; its future resolves with
        ``aborted=True`` and what it generated so far."""
        ...

    def progress(self, request_id: str) -> Progress | None:
        """Tokens generated so far, or None if the request is unknown or not started."""
        ...

    def check_health(self) -> bool:
        """Whether the scheduler is alive and accepting requests."""
        ...

    def close(self) -> None:
        """Stop the scheduler; every pending request fails, none hangs."""
        ...
