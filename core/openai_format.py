"""OpenAI's request and response shapes, and the mapping of OpenAI's parameters to ours.

A completion request (the body of ``POST /v1/completions`` and of each batch line)
uses OpenAI's names with OpenAI's meanings, mapped to :class:`GenerationParams`:

- ``max_tokens`` → ``max_new_tokens``; omitted means 16, OpenAI's default.
- ``temperature`` (default 1, as at OpenAI): 0 means greedy decoding, above 0
  sampling at that temperature. ``do_sample`` (an extension) overrides the choice.
- ``top_p``, ``seed``, ``stop`` (a string or a list) keep their names; ``n`` →
  ``num_return_sequences`` (more than one needs sampling, or ``num_beams >= n``).
- OpenAI samples from the whole distribution, so ``top_k`` is 0 (off) unless given,
  not transformers' 50.
- transformers' ``top_k``, ``num_beams``, ``early_stopping``, ``repetition_penalty``,
  ``no_repeat_ngram_size`` and ``do_sample`` are accepted as extensions.
- ``logprobs`` (0 to 5) → ``logprobs`` with that many ``top_logprobs``.
- ``response_format`` (an extension here; OpenAI has it on chat): ``json_object`` or
  ``json_schema``, constrained generation (core/structured.py).
- ``stream`` and ``stream_options`` (``include_usage``) are OpenAI's on the two
  endpoints (core/openai_stream.py makes the chunks); a batch line may not stream.
- OpenAI parameters genq does not implement (``echo``, ``best_of``, ``suffix``,
  ``logit_bias``, the penalties) are accepted at their default values only;
  ``user`` is accepted and ignored. Any other field is an error.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from core import text
from core.chat import ChatMessage, Messages, check_conversation, template_messages
from core.errors import InvalidRequestError
from core.logprobs import chat_logprobs, completion_logprobs, sequence
from core.schemas import (
    MAX_NEW_TOKENS_LIMIT,
    MAX_PROMPT_CHARS,
    MAX_SEQUENCES,
    MAX_STOP_STRINGS,
    GenerationParams,
    StopString,
)
from core.settings import served_model

OPENAI_DEFAULT_MAX_TOKENS = 16
COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS_URL, CHAT_URL)

# Accepted only at these values (None: omitted); anything else is "not supported".
_DEFAULT_ONLY: dict[str, tuple[object, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


class RequestError(InvalidRequestError):
    """A request that cannot be run: OpenAI's error ``code``, a message and the param."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_usage: StrictBool | None = None
    # OpenAI pads chunks against a length side channel unless told not to; genq
    # does not pad, so either value means what genq does.
    include_obfuscation: StrictBool | None = None


class SamplingRequest(BaseModel):
    """What OpenAI's completion and chat completion requests share, with
    transformers' extensions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_SEQUENCES)
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    best_of: int | None = Field(default=None, ge=1, le=MAX_SEQUENCES)
    user: str | None = Field(default=None, max_length=512)
    response_format: dict[str, Any] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    # Accepted at their defaults only (see _DEFAULT_ONLY).
    echo: Any = None
    suffix: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    # transformers' extensions
    do_sample: bool | None = None
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    num_beams: int | None = Field(default=None, ge=1, le=MAX_SEQUENCES)
    early_stopping: bool | Literal["never"] | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    no_repeat_ngram_size: int | None = Field(default=None, ge=0, le=64)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator(*_DEFAULT_ONLY)
    @classmethod
    def _default_only(cls, value: object, info: Any) -> object:
        allowed = _DEFAULT_ONLY[info.field_name]
        if value is None or any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise ValueError(f"{info.field_name} is not supported by genq; omit it")

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value: StreamOptions | None, info: Any) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options needs stream to be true")
        return value

    def top_logprobs_asked(self) -> int | None:
        """How many top logprobs per token (None: no logprobs at all)."""
        raise NotImplementedError

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """OpenAI's completion request (``POST /v1/completions``)."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: object) -> object:
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str):
                return value[0]
            raise ValueError(
                "prompt must be one string (lists of prompts or of token ids are not "
                "supported: send one request per prompt)"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class ChatCompletionRequest(SamplingRequest):
    """OpenAI's chat completion request (``POST /v1/chat/completions``)."""

    messages: Messages
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _answerable(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        return check_conversation(value)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")
        return value

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def to_params(
    request: SamplingRequest, *, default_max_tokens: int = OPENAI_DEFAULT_MAX_TOKENS
) -> GenerationParams:
    """The generation parameters meaning what ``request`` means at OpenAI."""
    temperature = 1.0 if request.temperature is None else request.temperature
    do_sample = request.do_sample if request.do_sample is not None else temperature > 0
    n = request.n or 1
    num_beams = request.num_beams or 1
    if request.best_of is not None and request.best_of != n:
        raise RequestError(
            "invalid_request", "best_of is not supported by genq unless it equals n", "best_of"
        )
    if do_sample and temperature <= 0:
        raise RequestError(
            "invalid_request", "temperature must be > 0 when do_sample is true", "temperature"
        )
    if n > 1 and not do_sample and num_beams < n:
        raise RequestError(
            "invalid_request",
            "n > 1 needs sampling (temperature > 0) or num_beams >= n; greedy decoding "
            "yields one sequence",
            "n",
        )
    max_tokens = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens:
        max_tokens = request.max_completion_tokens  # OpenAI's newer name wins
    values: dict[str, Any] = {
        "max_new_tokens": max_tokens or default_max_tokens,
        "do_sample": do_sample,
        "top_k": 0 if request.top_k is None else request.top_k,
        "num_return_sequences": n,
        "num_beams": num_beams,
    }
    if do_sample:
        values["temperature"] = temperature
    optional = {
        "top_p": request.top_p,
        "stop": request.stop,
        "seed": request.seed,
        "early_stopping": request.early_stopping,
        "repetition_penalty": request.repetition_penalty,
        "no_repeat_ngram_size": request.no_repeat_ngram_size,
        "response_format": request.response_format,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    top = request.top_logprobs_asked()
    if top is not None:
        values.update(logprobs=True, top_logprobs=top)
    return validate_params(values)


def _validated(values: dict[str, Any]) -> GenerationParams:
    """``GenerationParams.model_validate(values)``, remembered for plain values: the
    lines of a batch mostly share their parameters, and the result is frozen."""
    plain = tuple(values.values())
    try:  # the types too: 1 == 1.0 == True, but they do not validate alike
        return _validated_plain(tuple(values), plain, tuple(map(type, plain)))
    except TypeError:  # a list or dict among the values (stop, response_format)
        return GenerationParams.model_validate(values)


@functools.lru_cache(maxsize=256)
def _validated_plain(
    keys: tuple[str, ...], plain: tuple[Any, ...], _types: tuple[type, ...]
) -> GenerationParams:
    return GenerationParams.model_validate(dict(zip(keys, plain, strict=True)))


def validate_params(values: dict[str, Any]) -> GenerationParams:
    """``GenerationParams`` from OpenAI-mapped values; a :class:`RequestError` naming the
    parameter otherwise (``invalid_schema`` for a response format that cannot be run)."""
    try:
        return _validated(values)
    except ValidationError as exc:  # a combination OpenAI allows but transformers does not
        first = exc.errors()[0]
        message = str(first.get("msg", "invalid parameters")).removeprefix("Value error, ")
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] == "response_format":
            param = ".".join(loc)
            raise RequestError("invalid_schema", f"{param}: {message}", "response_format") from exc
        raise RequestError("invalid_request", message) from exc


def _problem(error: Any, prefix: str) -> RequestError:
    """One of pydantic's validation errors as the code, message and param it means."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    param = f"{prefix}{loc}" if loc else prefix.rstrip(".") or None
    kind = error.get("type")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        return RequestError("missing_required_parameter", f"missing required field {param}", param)
    if kind == "extra_forbidden":
        return RequestError("invalid_request", f"unknown field {param}", param)
    return RequestError("invalid_request", f"{param}: {message}" if param else message, param)


def _combined(problems: list[RequestError]) -> RequestError:
    """Every problem in one error: the first one's code and param, all the messages."""
    first = problems[0]
    if len(problems) == 1:
        return first
    return RequestError(first.code, "; ".join(p.message for p in problems), first.param)


def _error_from_validation(exc: ValidationError, prefix: str) -> RequestError:
    return _combined([_problem(error, prefix) for error in exc.errors()])


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request, ready to become a job (a chat one has ``messages``,
    rendered by the worker, and an empty prompt until then)."""

    custom_id: str | None
    prompt: str
    model: str
    params: GenerationParams
    messages: list[dict[str, str]] | None = None


_Request = TypeVar("_Request", CompletionRequest, ChatCompletionRequest)


def _parse(
    kind: type[_Request],
    body: object,
    *,
    models: Collection[str],
    prefix: str,
    default_max_tokens: int,
    without_template: Collection[str] = (),
    may_stream: bool = False,
) -> tuple[_Request, GenerationParams]:
    """Validate a request body of ``kind``; raise :class:`RequestError` naming what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "the body must be a JSON object", prefix or None)
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        raise _error_from_validation(exc, prefix) from exc
    if request.stream and not may_stream:
        raise RequestError(
            "invalid_request",
            f"{prefix}stream: a batch request cannot stream; omit stream or set it to false",
            f"{prefix}stream",
        )
    # One id per model however the caller spells it; an error names it as spelt.
    served = served_model(request.model, models)
    if served is None:
        raise RequestError(
            "model_not_found",
            f"model {request.model!r} is not served; available: {', '.join(models)}",
            f"{prefix}model",
        )
    if served != request.model:
        request = request.model_copy(update={"model": served})
    if request.model in without_template:
        raise RequestError(
            "model_without_chat_template",
            f"model {request.model!r} has no chat template: send a prompt to "
            f"{COMPLETIONS_URL} instead",
            f"{prefix}model",
        )
    try:
        params = to_params(request, default_max_tokens=default_max_tokens)
    except RequestError as exc:
        raise RequestError(exc.code, exc.message, f"{prefix}{exc.param or ''}" or None) from exc
    return request, params


def parse_completion(
    body: object,
    *,
    models: Collection[str],
    prefix: str = "",
    default_max_tokens: int = OPENAI_DEFAULT_MAX_TOKENS,
    may_stream: bool = False,
) -> tuple[CompletionRequest, GenerationParams]:
    """Validate a completion body; raise :class:`RequestError` naming what is wrong.
    ``may_stream``: ``stream: true`` is allowed (the endpoint, not a batch line)."""
    return _parse(
        CompletionRequest,
        body,
        models=models,
        prefix=prefix,
        default_max_tokens=default_max_tokens,
        may_stream=may_stream,
    )


def parse_chat(
    body: object,
    *,
    models: Collection[str],
    without_template: Collection[str] = (),
    prefix: str = "",
    default_max_tokens: int = OPENAI_DEFAULT_MAX_TOKENS,
    may_stream: bool = False,
) -> tuple[ChatCompletionRequest, GenerationParams]:
    """Validate a chat completion body; raise :class:`RequestError` naming what is wrong.

    ``without_template``: served models known to have no chat template (their live
    workers say so); a chat request for one is ``model_without_chat_template``.
    ``may_stream``: ``stream: true`` is allowed (the endpoint, not a batch line).
    """
    return _parse(
        ChatCompletionRequest,
        body,
        models=models,
        prefix=prefix,
        default_max_tokens=default_max_tokens,
        without_template=without_template,
        may_stream=may_stream,
    )


# One line of a batch file: a prompt may be 200,000 characters, 6 bytes each when
# JSON-escaped; nothing a request needs nests more than a few levels.
MAX_LINE_BYTES = 2 * 1024 * 1024
MAX_LINE_DEPTH = 32
_too_deep = f"the line nests arrays or objects more than {MAX_LINE_DEPTH} deep"


class BatchLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: str
    url: str
    body: dict[str, Any]


def _utf8(raw: bytes | str) -> bytes | str:
    """The line as ``json.loads`` reads it: decoded here when it is plain UTF-8 (what
    json.loads would find, decoding as it does), which spares its encoding sniffing."""
    if isinstance(raw, str) or raw.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return raw
    if b"\x00" in raw[:4]:  # UTF-16 or UTF-32: json.loads detects which
        return raw
    return raw.decode("utf-8", "surrogatepass")


def _may_nest(raw: bytes | str) -> bool:
    """Whether the line can nest deeper than :data:`MAX_LINE_DEPTH` (it cannot with
    fewer brackets than that, counting those inside strings too): the walk is skipped
    for a usual line, which holds a handful."""
    if isinstance(raw, str):
        return raw.count("{") + raw.count("[") > MAX_LINE_DEPTH
    return raw.count(b"{") + raw.count(b"[") > MAX_LINE_DEPTH


def _may_be_unstorable(raw: bytes | str) -> bool:
    """Whether a string of the line may be unstorable (for raw bytes, only an escape
    can make one: :func:`core.text.may_hold_unstorable`); else the walk is skipped."""
    return isinstance(raw, str) or text.may_hold_unstorable(raw)


def parse_batch_line(
    raw: bytes | str,
    *,
    endpoint: str,
    models: Collection[str],
    without_template: Collection[str] = (),
    default_max_tokens: int = OPENAI_DEFAULT_MAX_TOKENS,
) -> ParsedRequest:
    """Validate one JSONL line of a batch input file; raise :class:`RequestError`."""
    if len(raw) > MAX_LINE_BYTES:
        raise RequestError(
            "line_too_large", f"the line is longer than the limit of {MAX_LINE_BYTES} bytes"
        )
    try:
        data = json.loads(_utf8(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = text.storable(str(exc), 200)
        raise RequestError("invalid_json_line", f"the line is not valid JSON: {reason}") from exc
    except RecursionError as exc:
        raise RequestError("line_too_deep", _too_deep) from exc
    if not isinstance(data, dict):
        raise RequestError("invalid_json_line", "the line must be a JSON object")
    if _may_nest(raw) and text.depth_exceeds(data, MAX_LINE_DEPTH):
        raise RequestError("line_too_deep", _too_deep)
    if _may_be_unstorable(raw) and (bad := text.first_unstorable(data)) is not None:
        raise RequestError("invalid_text", f"{bad[0]}: {bad[1]}", bad[0] or None)
    # Every problem of the line is reported, not only the first one found.
    problems: list[RequestError] = []
    try:
        line: BatchLine | None = BatchLine.model_validate(data)
    except ValidationError as exc:
        problems.append(_error_from_validation(exc, ""))
        line = None
    url = line.url if line is not None else endpoint
    if line is not None and line.method.upper() != "POST":
        problems.append(
            RequestError("invalid_method", f"method must be POST, not {line.method!r}", "method")
        )
    if line is not None and line.url != endpoint:
        problems.append(
            RequestError(
                "invalid_url",
                f"url {line.url!r} is not this batch's endpoint {endpoint!r}"
                if line.url in ENDPOINTS
                else f"url {line.url!r} is not supported; genq serves {', '.join(ENDPOINTS)}",
                "url",
            )
        )
        url = endpoint
    body = data.get("body")
    parsed: ParsedRequest | None = None
    if isinstance(body, dict):
        try:
            parsed = _parse_body(
                url,
                body,
                custom_id=line.custom_id if line is not None else None,
                models=models,
                without_template=without_template,
                default_max_tokens=default_max_tokens,
            )
        except RequestError as exc:
            problems.append(exc)
    if problems:
        raise _combined(problems)
    assert parsed is not None  # a line without problems has a valid body
    return parsed


def _parse_body(
    url: str,
    body: dict[str, Any],
    *,
    custom_id: str | None,
    models: Collection[str],
    without_template: Collection[str],
    default_max_tokens: int,
) -> ParsedRequest:
    """A batch line's body, as the endpoint ``url`` reads it."""
    if url == CHAT_URL:
        chat, params = parse_chat(
            body,
            models=models,
            without_template=without_template,
            prefix="body.",
            default_max_tokens=default_max_tokens,
        )
        return ParsedRequest(custom_id, "", chat.model, params, template_messages(chat.messages))
    request, params = parse_completion(
        body, models=models, prefix="body.", default_max_tokens=default_max_tokens
    )
    return ParsedRequest(custom_id, request.prompt, request.model, params)


# --- responses --------------------------------------------------------------------


class JobLike(Protocol):
    """The columns of a job row the response shapes need."""

    id: str
    custom_id: str | None
    model: str
    outputs: list[str] | None
    finish_reasons: list[str] | None
    logprobs: list[Any] | None
    messages: list[Any] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error_code: str | None
    error_message: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def status(self) -> str: ...  # read-only, so a JobStatus column fits


def unix(moment: dt.datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def finish_reason(reason: str | None) -> str:
    """OpenAI's finish reason: ``stop`` (end of text or a stop string) or ``length``."""
    return "length" if reason == "length" else "stop"


def completion_object(job: JobLike) -> dict[str, Any]:
    """A succeeded job as OpenAI's ``text_completion`` object."""
    outputs = job.outputs or [""]
    reasons = job.finish_reasons or []
    prompt_tokens = job.prompt_tokens or 0
    completion_tokens = job.completion_tokens or 0
    return {
        "id": f"cmpl-{job.id}",
        "object": "text_completion",
        "created": unix(job.finished_at or job.created_at),
        "model": job.model,
        "choices": [
            {
                "index": i,
                "text": text,
                "finish_reason": finish_reason(reasons[i] if i < len(reasons) else None),
                "logprobs": completion_logprobs(sequence(job.logprobs, i)),
            }
            for i, text in enumerate(outputs)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_completion_object(job: JobLike) -> dict[str, Any]:
    """A succeeded chat job as OpenAI's ``chat.completion`` object."""
    completion = completion_object(job)
    completion["id"] = f"chatcmpl-{job.id}"
    completion["object"] = "chat.completion"
    completion["choices"] = [
        {
            "index": choice["index"],
            "message": {"role": "assistant", "content": choice["text"], "refusal": None},
            "finish_reason": choice["finish_reason"],
            "logprobs": chat_logprobs(sequence(job.logprobs, choice["index"])),
        }
        for choice in completion["choices"]
    ]
    return completion


def response_object(job: JobLike) -> dict[str, Any]:
    """A succeeded job in the shape of the endpoint that made it (chat or completion)."""
    return chat_completion_object(job) if job.messages is not None else completion_object(job)


CLIENT_ERRORS = frozenset(
    {
        "prompt_too_long",
        "invalid_request",
        "model_not_served",
        "invalid_schema",
        "model_without_chat_template",
    }
)


def error_status(code: str | None) -> int:
    """The HTTP status a failed job's error maps to: 400 for the request's fault."""
    return 400 if code in CLIENT_ERRORS else 500


def error_object(code: str, message: str) -> dict[str, Any]:
    """OpenAI's ``error`` object: a server error, or the request's fault."""
    kind = "server_error" if error_status(code) >= 500 else "invalid_request_error"
    return {"message": message, "type": kind, "param": None, "code": code}


def result_line(job: JobLike, *, cancel_code: str = "batch_cancelled") -> dict[str, Any]:
    """A job as a line of a batch's output file (succeeded) or error file (otherwise)."""
    request_id = job.id
    line: dict[str, Any] = {"id": f"batch_req_{job.id}", "custom_id": job.custom_id}
    if job.status == "succeeded":
        line["response"] = {
            "status_code": 200,
            "request_id": request_id,
            "body": response_object(job),
        }
        line["error"] = None
    elif job.status == "failed":
        code = job.error_code or "internal_error"
        message = job.error_message or "generation failed"
        line["response"] = {
            "status_code": error_status(code),
            "request_id": request_id,
            "body": {"error": error_object(code, message)},
        }
        line["error"] = {"code": code, "message": message}
    elif job.status == "cancelled":
        what = "expired before it ran" if cancel_code == "batch_expired" else "was cancelled"
        line["response"] = None
        line["error"] = {"code": cancel_code, "message": f"the request {what}"}
    else:  # not final: only `genq run` asks for every line, after all are final
        line["response"] = None
        line["error"] = {"code": "not_finished", "message": f"the request is {job.status}"}
    return line


def dump_line(obj: dict[str, Any]) -> bytes:
    """One JSONL line (compact, UTF-8, newline-terminated)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def error_list(errors: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's ``errors`` object of a batch."""
    return {"object": "list", "data": list(errors)}


def list_object(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's list envelope, with the cursors its SDK pages with."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
