"""Chat requests in the batching engine: the model's own template renders them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.schemas import GenerationParams
from worker.engine.base import GenerationError, GenerationRequest

MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Once upon a time"},
]


def chat_request(messages: list[dict[str, str]], **params: Any) -> GenerationRequest:
    return GenerationRequest(
        id=f"chat-{id(messages)}-{len(params)}",
        prompt="",
        params=GenerationParams(**params),
        seed=0,
        messages=messages,
    )


def test_chat_output_equals_generate_on_the_templated_prompt(
    chat_model: Any, make_engine: Any
) -> None:
    model, tokenizer, info = chat_model
    assert info.chat_template
    engine = make_engine(chat_model)
    result = engine.submit(chat_request(MESSAGES, max_new_tokens=24)).result(timeout=30)

    ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(
            **ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result.outputs[0] == expected
    assert result.prompt == tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    assert result.prompt_tokens == ids["input_ids"].shape[1]


def test_a_model_without_a_template_fails_the_chat_request_only(
    stories: Any, make_engine: Any
) -> None:
    engine = make_engine(stories)
    assert not stories[2].chat_template
    future = engine.submit(chat_request(MESSAGES, max_new_tokens=4))
    with pytest.raises(GenerationError) as info:
        future.result(timeout=30)
    assert info.value.code == "model_without_chat_template"
    assert stories[2].name in info.value.message
    plain = GenerationRequest(id="plain", prompt="Hello", params=GenerationParams(), seed=0)
    assert engine.submit(plain).result(timeout=30).outputs


def test_a_template_that_refuses_the_messages_fails_the_request(
    chat_model: Any, make_engine: Any
) -> None:
    engine = make_engine(chat_model)
    tokenizer = chat_model[1]
    original = tokenizer.chat_template
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        future = engine.submit(chat_request(MESSAGES, max_new_tokens=4))
        with pytest.raises(GenerationError) as info:
            future.result(timeout=30)
    finally:
        tokenizer.chat_template = original
    assert info.value.code == "invalid_request"
    assert "roles must alternate" in info.value.message
    assert engine.check_health()
