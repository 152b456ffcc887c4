"""Structured output in the batching engine: every constrained output parses and
validates, on a model with random weights (which left alone never writes JSON)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.engine.helpers import reference, request
from worker.engine.base import GenerationError

# Bounded schemas (string lengths, integer ranges, array sizes): a random model must
# finish them within max_new_tokens, so every output must parse.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}
LABEL = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "maxItems": 3,
        },
    },
    "required": ["label", "tags"],
    "additionalProperties": False,
}
CHOICE = {"type": "array", "items": {"enum": [1, 2, 3, "x", None]}, "minItems": 1, "maxItems": 4}
SCHEMAS = [PERSON, LABEL, CHOICE]
PROMPTS = ["Once upon a time", "Extract the person:", "Hello", "The dog and the cat"]


def schema_format(schema: dict[str, Any], name: str = "out") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def test_hundred_constrained_outputs_all_validate(gpt2: Any, make_engine: Any) -> None:
    """100 requests (greedy and sampled, several schemas, sharing decode steps) all
    return JSON valid against their schema, ended by the grammar, not by max_new_tokens."""
    engine = make_engine(gpt2, max_batch_size=32)
    cases = []
    for i in range(100):
        schema = SCHEMAS[i % len(SCHEMAS)]
        sample = {"do_sample": True, "temperature": 1.5, "top_k": 0} if i % 2 else {}
        future = engine.submit(
            request(
                PROMPTS[i % len(PROMPTS)],
                seed=i,
                max_new_tokens=200,
                response_format=schema_format(schema),
                **sample,
            )
        )
        cases.append((schema, future))
    for schema, future in cases:
        result = future.result(timeout=120)
        assert result.finish_reasons[0] != "length", result.outputs
        jsonschema.validate(json.loads(result.outputs[0]), schema)


def test_json_object_and_free_rows_share_steps(gpt2: Any, make_engine: Any) -> None:
    """A free greedy request in the same batch as constrained ones keeps its tokens."""
    engine = make_engine(gpt2)
    free = engine.submit(request("Hello world", max_new_tokens=24))
    constrained = [
        engine.submit(request(p, max_new_tokens=60, response_format=schema_format(PERSON), seed=s))
        for s, p in enumerate(PROMPTS)
    ]
    obj = engine.submit(request("Hi", max_new_tokens=30, response_format={"type": "json_object"}))
    assert free.result(timeout=60).outputs == reference(gpt2, "Hello world", max_new_tokens=24)
    for future in constrained:
        jsonschema.validate(json.loads(future.result(timeout=60).outputs[0]), PERSON)
    result = obj.result(timeout=60)
    # Unbounded (any object): it may be cut by max_new_tokens, which finish_reason says.
    if result.finish_reasons[0] != "length":
        assert isinstance(json.loads(result.outputs[0]), dict)
    else:
        assert result.outputs[0].startswith("{")


def test_several_sequences_each_constrained(gpt2: Any, make_engine: Any) -> None:
    """num_return_sequences rows each get their own matcher."""
    engine = make_engine(gpt2)
    result = engine.submit(
        request(
            "Go",
            seed=3,
            do_sample=True,
            num_return_sequences=3,
            max_new_tokens=120,
            response_format=schema_format(LABEL),
        )
    ).result(timeout=60)
    assert len(result.outputs) == 3
    for text in result.outputs:
        jsonschema.validate(json.loads(text), LABEL)


def test_unsatisfiable_schema_fails_only_its_request(gpt2: Any, make_engine: Any) -> None:
    """A schema the grammar compiler accepts but cannot build a matcher for fails the
    request with a typed error; the engine goes on."""
    from core.schemas import GenerationParams

    engine = make_engine(gpt2)
    params = GenerationParams.model_construct(  # skips the API-side check on purpose
        max_new_tokens=10,
        response_format=GenerationParams.model_validate(
            {"response_format": schema_format({"type": "object"})}
        ).response_format,
    )
    good = engine.submit(request("Hello", max_new_tokens=5))
    from worker.engine.base import GenerationRequest

    bad_format = params.response_format.model_copy(  # type: ignore[union-attr]
        update={
            "json_schema": params.response_format.json_schema.model_copy(  # type: ignore[union-attr]
                update={"schema_": {"type": "nope"}}
            )
        }
    )
    bad = engine.submit(
        GenerationRequest(
            id="bad",
            prompt="Hello",
            params=params.model_copy(update={"response_format": bad_format}),
            seed=0,
        )
    )
    with pytest.raises(GenerationError) as info:
        bad.result(timeout=30)
    assert info.value.code == "invalid_request"
    assert "nope" in info.value.message
    assert good.result(timeout=30).outputs == reference(gpt2, "Hello", max_new_tokens=5)


def test_sentencepiece_style_tokenizers_are_constrained_too(stories: Any, make_engine: Any) -> None:
    """A Llama tokenizer (Metaspace, byte tokens): llguidance cannot read its decoder
    from tokenizer.json, so it gets the tokens' bytes; the outputs still validate."""
    engine = make_engine(stories)
    futures = [
        engine.submit(
            request(
                p,
                seed=s,
                do_sample=bool(s % 2),
                max_new_tokens=120,
                response_format=schema_format(PERSON),
            )
        )
        for s, p in enumerate(PROMPTS)
    ]
    for future in futures:
        result = future.result(timeout=60)
        assert result.finish_reasons[0] != "length", result.outputs
        jsonschema.validate(json.loads(result.outputs[0]), PERSON)
