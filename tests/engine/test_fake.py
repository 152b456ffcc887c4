"""The fake engine: deterministic, torch-free, and honest about abort and progress."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.engine.helpers import request, wait_for_tokens
from worker.engine.base import GenerationError
from worker.engine.fake import FakeEngine


def test_output_is_a_function_of_the_request() -> None:
    engine = FakeEngine()
    try:
        result = engine.submit(request("one two three", max_new_tokens=4)).result(timeout=5)
        assert result.outputs == [" three two one three"]
        assert result.finish_reasons == ["length"]
        assert (result.prompt_tokens, result.completion_tokens) == (3, 4)
        again = engine.submit(request("one two three", max_new_tokens=4)).result(timeout=5)
        assert again == result
    finally:
        engine.close()


def test_stop_and_sequences() -> None:
    engine = FakeEngine()
    try:
        req = request("a b c", max_new_tokens=6, stop=["a"], do_sample=True, num_return_sequences=2)
        result = engine.submit(req).result(timeout=5)
        assert result.outputs == [" c b ", " c b "]
        assert result.finish_reasons == ["stop", "stop"]
    finally:
        engine.close()


def test_prompt_too_long() -> None:
    engine = FakeEngine(max_prompt_words=2)
    try:
        with pytest.raises(GenerationError) as info:
            engine.submit(request("a b c")).result(timeout=5)
        assert info.value.code == "prompt_too_long"
    finally:
        engine.close()


def test_abort_and_progress() -> None:
    engine = FakeEngine(token_delay_s=0.01)
    try:
        req = request("x y", max_new_tokens=1000)
        future = engine.submit(req)
        wait_for_tokens(engine, req.id, 3)
        progress = engine.progress(req.id)
        assert progress is not None and progress.text.startswith(" y x")
        engine.abort(req.id)
        result = future.result(timeout=5)
        assert result.aborted and 3 <= result.completion_tokens < 1000
        assert engine.info.name == "fake"
    finally:
        engine.close()
    assert not engine.check_health()


def test_build_fake_engine_without_torch() -> None:
    code = (
        "import sys\n"
        "from core.settings import Settings\n"
        "from worker.engine import build_engine\n"
        "e = build_engine(Settings(model='fake'))\n"
        "assert e.info.name == 'fake'\n"
        "e.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
