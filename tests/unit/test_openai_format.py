"""OpenAI's parameters mapped to generation parameters, with OpenAI's meanings."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest

from core.openai_format import (
    RequestError,
    completion_object,
    parse_batch_line,
    parse_completion,
    result_line,
)
from core.schemas import GenerationParams


def params(**body: Any) -> GenerationParams:
    _, mapped = parse_completion({"model": "m", "prompt": "hi", **body}, models=["m"])
    return mapped


def test_defaults_are_openais_max_16_tokens_and_sampling_at_temperature_1_without_top_k() -> None:
    p = params()
    assert p.max_new_tokens == 16
    assert p.do_sample is True and p.temperature == 1.0
    assert p.top_k == 0 and p.top_p == 1.0
    assert p.num_return_sequences == 1 and p.seed is None


def test_temperature_0_is_greedy() -> None:
    p = params(temperature=0)
    assert p.do_sample is False
    assert params(temperature=0.3).do_sample is True
    assert params(temperature=0.3).temperature == 0.3


def test_do_sample_extension_overrides_the_temperature_choice() -> None:
    assert params(temperature=0.7, do_sample=False).do_sample is False
    with pytest.raises(RequestError) as exc:
        params(temperature=0, do_sample=True)
    assert exc.value.param == "temperature"


def test_names_map_to_transformers_names() -> None:
    p = params(max_tokens=40, top_p=0.9, n=3, stop="\n", seed=42)
    assert p.max_new_tokens == 40 and p.top_p == 0.9
    assert p.num_return_sequences == 3 and p.stop == ["\n"] and p.seed == 42
    assert params(stop=[".", "!"]).stop == [".", "!"]
    assert params(prompt=["one prompt"]).max_new_tokens == 16


def test_transformers_extensions_are_accepted() -> None:
    p = params(
        temperature=0,
        num_beams=4,
        early_stopping=True,
        top_k=5,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        n=2,
    )
    assert (p.num_beams, p.early_stopping, p.top_k) == (4, True, 5)
    assert (p.repetition_penalty, p.no_repeat_ngram_size, p.num_return_sequences) == (1.3, 2, 2)


def test_n_above_1_needs_sampling_or_beams() -> None:
    with pytest.raises(RequestError) as exc:
        params(n=2, temperature=0)
    assert exc.value.param == "n"
    assert params(n=2).num_return_sequences == 2


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"max_tokens": 0}, "max_tokens", "invalid_request"),
        ({"temperature": 2.5}, "temperature", "invalid_request"),
        ({"top_p": 0}, "top_p", "invalid_request"),
        ({"n": 100}, "n", "invalid_request"),
        ({"stop": ["a"] * 20}, "stop", "invalid_request"),
        ({"seed": -1}, "seed", "invalid_request"),
        ({"stream": True}, "stream", "invalid_request"),  # not in a batch line
        ({"stream": 1}, "stream", "invalid_request"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_request"),
        ({"echo": True}, "echo", "invalid_request"),
        ({"logprobs": 6}, "logprobs", "invalid_request"),
        ({"presence_penalty": 0.5}, "presence_penalty", "invalid_request"),
        ({"best_of": 3}, "best_of", "invalid_request"),
        ({"frobnicate": 1}, "frobnicate", "invalid_request"),
        ({"prompt": ["a", "b"]}, "prompt", "invalid_request"),
        ({"prompt": [1, 2, 3]}, "prompt", "invalid_request"),
        ({"prompt": "  "}, "prompt", "invalid_request"),
        ({"model": "other"}, "model", "model_not_found"),
    ],
)
def test_out_of_range_or_unsupported_values_name_their_param(
    body: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(RequestError) as exc:
        params(**body)
    assert exc.value.param == param and exc.value.code == code
    assert exc.value.message


def test_defaults_of_unsupported_parameters_and_user_are_accepted() -> None:
    p = params(stream=False, echo=False, logprobs=None, presence_penalty=0, best_of=1, user="u")
    assert p.max_new_tokens == 16


def test_the_endpoints_may_stream() -> None:
    body = {"model": "m", "prompt": "hi", "stream": True}
    request, _ = parse_completion(body, models=["m"], may_stream=True)
    assert request.stream and not request.include_usage()
    body["stream_options"] = {"include_usage": True}
    assert parse_completion(body, models=["m"], may_stream=True)[0].include_usage()


def test_missing_fields() -> None:
    for body, param in (({"prompt": "hi"}, "model"), ({"model": "m"}, "prompt")):
        with pytest.raises(RequestError) as exc:
            parse_completion(body, models=["m"])
        assert exc.value.code == "missing_required_parameter" and exc.value.param == param


def test_a_batch_line_is_parsed_with_body_params_prefixed() -> None:
    raw = (
        b'{"custom_id": "c1", "method": "POST", "url": "/v1/completions",'
        b' "body": {"model": "m", "prompt": "hi", "max_tokens": 3}}'
    )
    parsed = parse_batch_line(raw, endpoint="/v1/completions", models=["m"])
    assert (parsed.custom_id, parsed.prompt, parsed.model) == ("c1", "hi", "m")
    assert parsed.params.max_new_tokens == 3
    bad = raw.replace(b'"max_tokens": 3', b'"max_tokens": -3')
    with pytest.raises(RequestError) as exc:
        parse_batch_line(bad, endpoint="/v1/completions", models=["m"])
    assert exc.value.param == "body.max_tokens"


def job(**values: Any) -> Any:
    base = {
        "id": "job_1",
        "custom_id": "c1",
        "status": "succeeded",
        "model": "m",
        "outputs": [" a", " b"],
        "finish_reasons": ["eos", "length"],
        "logprobs": None,
        "messages": None,
        "prompt_tokens": 2,
        "completion_tokens": 5,
        "error_code": None,
        "error_message": None,
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "finished_at": dt.datetime(2026, 1, 1, 0, 0, 5, tzinfo=dt.UTC),
    }
    return SimpleNamespace(**(base | values))


def test_the_completion_object_and_result_lines() -> None:
    completion = completion_object(job())
    assert completion["object"] == "text_completion" and completion["id"] == "cmpl-job_1"
    assert [c["finish_reason"] for c in completion["choices"]] == ["stop", "length"]
    assert [c["text"] for c in completion["choices"]] == [" a", " b"]
    assert completion["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert completion["created"] == int(dt.datetime(2026, 1, 1, 0, 0, 5, tzinfo=dt.UTC).timestamp())

    ok = result_line(job())
    assert ok["custom_id"] == "c1" and ok["error"] is None
    assert ok["response"]["status_code"] == 200 and ok["response"]["request_id"] == "job_1"
    failed = result_line(job(status="failed", error_code="internal_error", error_message="boom"))
    assert failed["response"]["status_code"] == 500
    assert failed["error"] == {"code": "internal_error", "message": "boom"}
    expired = result_line(job(status="cancelled"), cancel_code="batch_expired")
    assert expired["response"] is None and expired["error"]["code"] == "batch_expired"


def test_a_model_spelt_as_another_path_to_the_served_directory_is_that_model(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = tmp_path / "models" / "tiny"
    served.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    raw = (
        '{"custom_id": "a", "method": "POST", "url": "/v1/completions",'
        ' "body": {"model": "./link/tiny", "prompt": "hi"}}'
    )
    parsed = parse_batch_line(raw, endpoint="/v1/completions", models=[str(served.resolve())])
    assert parsed.model == str(served.resolve())


def test_a_batch_line_with_two_problems_reports_both() -> None:
    raw = (
        '{"custom_id": "a", "method": "GET", "url": "/v1/completions",'
        ' "body": {"model": "m", "prompt": "hi", "max_tokens": -1}}'
    )
    with pytest.raises(RequestError) as caught:
        parse_batch_line(raw, endpoint="/v1/completions", models=["m"])
    assert caught.value.param == "method"
    assert "method must be POST" in caught.value.message
    assert "body.max_tokens" in caught.value.message


def test_a_body_with_two_invalid_fields_names_both() -> None:
    with pytest.raises(RequestError) as caught:
        parse_completion({"model": "m", "prompt": "hi", "top_p": 7, "n": 0}, models=["m"])
    assert "top_p" in caught.value.message and "n" in caught.value.message
