"""Structured output: OpenAI's ``response_format`` and the grammar it compiles to.

``{"type": "json_object"}`` asks for any JSON object; ``{"type": "json_schema",
"json_schema": {"name": ..., "schema": {...}}}`` for JSON valid against a schema.
Both compile to an llguidance grammar (a JSON string). llguidance was chosen by
measurement on CPU (bench/README.md: schema compile ~1 ms, mask plus advance ~0.1 ms
per token on GPT-2's vocabulary), and because it has no dependency at all, torch
included, so the API validates a schema with the very compiler the worker uses: a
schema the API accepts is one the worker can constrain to.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal

import llguidance
from pydantic import BaseModel, ConfigDict, Field

MAX_SCHEMA_CHARS = 100_000


class UnsupportedSchemaError(ValueError):
    """A ``response_format`` the grammar compiler refuses; the message says why."""


class TextFormat(BaseModel):
    """``{"type": "text"}``: no constraint (OpenAI's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """``{"type": "json_object"}``: any JSON object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    """The ``json_schema`` member of a json_schema response format (OpenAI's shape)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True
    )

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    # ``schema`` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    """``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


def schema_of(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON schema the output must satisfy, or None when the output is free text."""
    if response_format is None or isinstance(response_format, TextFormat):
        return None
    if isinstance(response_format, JsonObjectFormat):
        return {"type": "object"}
    return response_format.json_schema.schema_


def grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The llguidance grammar of a response format (None for free text).

    Raises :class:`UnsupportedSchemaError` naming the problem when the schema is not
    valid or uses what the compiler does not implement.
    """
    schema = schema_of(response_format)
    if schema is None:
        return None
    return _compile(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _compile(schema_json: str) -> str:
    # Bulk extraction sends the same schema thousands of times: compile it once.
    if len(schema_json) > MAX_SCHEMA_CHARS:
        raise UnsupportedSchemaError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters")
    try:
        # Compact JSON, no free whitespace between tokens: with flexible whitespace a
        # weak model can emit newlines forever inside a valid object.
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema_json, defaults={"whitespace_flexible": False}
        )
    except ValueError as exc:
        raise UnsupportedSchemaError(f"the schema is not a JSON object schema: {exc}") from exc
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise UnsupportedSchemaError(f"unsupported or invalid schema: {problem.strip()}")
    return grammar
