"""``genq run``'s input: its formats (genq's job lines, OpenAI batch lines, plain
text), parsed into requests or line errors, and the key that finds an earlier run
of the same input (so a re-run resumes)."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Collection, Iterator
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.batches.ingest import LineError, Parsed
from core.chat import template_messages
from core.models import Batch
from core.openai_format import (
    CHAT_URL,
    COMPLETIONS_URL,
    OPENAI_DEFAULT_MAX_TOKENS,
    ParsedRequest,
    RequestError,
    parse_batch_line,
)
from core.schemas import GenerationParams, JobCreate
from core.settings import served_model
from core.status import BatchStatus


class InputFormat(enum.StrEnum):
    AUTO = "auto"
    JSONL = "jsonl"
    TEXT = "text"


def run_key(path: Path) -> str:
    """A hash of the input's absolute path and content, read in chunks."""
    content = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            content.update(chunk)
    return hashlib.sha256(f"{path.resolve()}\0{content.hexdigest()}".encode()).hexdigest()


def detect_format(path: Path) -> InputFormat:
    """JSONL when the first non-blank line starts with ``{``, else text."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                return (
                    InputFormat.JSONL
                    if raw.lstrip(b"\xef\xbb\xbf \t").startswith(b"{")
                    else InputFormat.TEXT
                )
    return InputFormat.TEXT


def parse_plain(
    data: dict[str, object], *, models: Collection[str], default_model: str, max_tokens: int
) -> ParsedRequest:
    """genq's job format: ``{"prompt", parameters with transformers' names, ...}``."""
    body = dict(data)
    custom_id = body.pop("custom_id", None)
    if custom_id is not None and (not isinstance(custom_id, str) or not custom_id):
        raise RequestError("invalid_request", "custom_id must be a non-empty string", "custom_id")
    try:
        job = JobCreate.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_request"
        raise RequestError(code, f"{param}: {message}" if param else message, param) from exc
    spelt = job.model or default_model
    model = served_model(spelt, models)
    if model is None:
        raise RequestError(
            "model_not_found",
            f"model {spelt!r} is not served; available: {', '.join(models)}",
            "model",
        )
    params = job.params().with_defaults(max_tokens)
    if job.messages is not None:
        return ParsedRequest(custom_id, "", model, params, template_messages(job.messages))
    return ParsedRequest(custom_id, job.prompt or "", model, params)


def parse_input(
    path: Path,
    fmt: InputFormat,
    *,
    models: Collection[str],
    default_model: str,
    max_tokens: int | None,
    default_max_tokens: int,
) -> Iterator[Parsed]:
    """Each non-blank line of the input, parsed or its error; streamed."""
    if fmt is InputFormat.AUTO:
        fmt = detect_format(path)
    text_params = GenerationParams(max_new_tokens=max_tokens or default_max_tokens)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                if fmt is InputFormat.TEXT:
                    prompt = line.decode()
                    yield number, ParsedRequest(None, prompt, default_model, text_params)
                    continue
                try:
                    data = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(
                        "invalid_json_line", f"the line is not valid JSON: {exc}"
                    ) from exc
                if not isinstance(data, dict):
                    raise RequestError("invalid_json_line", "the line must be a JSON object")
                if "body" in data or "url" in data:
                    yield (
                        number,
                        parse_batch_line(
                            line,
                            # genq run takes chat and completion lines in one file
                            endpoint=CHAT_URL if data.get("url") == CHAT_URL else COMPLETIONS_URL,
                            models=models,
                            default_max_tokens=max_tokens or OPENAI_DEFAULT_MAX_TOKENS,
                        ),
                    )
                else:
                    yield (
                        number,
                        parse_plain(
                            data,
                            models=models,
                            default_model=default_model,
                            max_tokens=max_tokens or default_max_tokens,
                        ),
                    )
            except UnicodeDecodeError as exc:
                yield number, LineError(number, "invalid_encoding", f"the line is not UTF-8: {exc}")
            except RequestError as exc:
                yield number, LineError(number, exc.code, exc.message, exc.param)


def find_run(session: Session, key: str, owner: str) -> Batch | None:
    """The latest batch of a previous run of the same input, unless it failed (or is
    still validating: that run's ingest died, and the sweeper fails it)."""
    return session.scalar(
        select(Batch)
        .where(
            Batch.run_key == key,
            Batch.owner == owner,
            Batch.status.not_in((BatchStatus.FAILED, BatchStatus.VALIDATING)),
        )
        .order_by(Batch.id.desc())
        .limit(1)
    )
