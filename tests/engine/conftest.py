"""Fixtures for the engine tests: tiny models loaded once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.settings import Settings
from tests.tiny_model import tiny_chat_model_dir, tiny_gpt2_dir, tiny_model_dir
from worker.engine.base import ModelInfo

# One thread: the tests are many small forwards, and the suite must be fast on 2 cores.
torch.set_num_threads(1)

Loaded = tuple[Any, Any, ModelInfo]


def _load(path: Path) -> Loaded:
    from worker.engine.loader import load_model

    # float32: the tests compare tokens with generate's, and auto may pick bf16.
    return load_model(Settings(model=str(path), torch_threads=1, dtype="float32"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def stories(models_dir: Path) -> Loaded:
    """The stories260k model (or a random tiny Llama where ../shared is absent)."""
    return _load(tiny_model_dir(models_dir))


@pytest.fixture(scope="session")
def chat_model(models_dir: Path) -> Loaded:
    """The tiny Llama with a chat template set in its tokenizer config."""
    return _load(tiny_chat_model_dir(models_dir))


@pytest.fixture(scope="session")
def gpt2(models_dir: Path) -> Loaded:
    """A random 2-layer GPT-2."""
    return _load(tiny_gpt2_dir(models_dir))


@pytest.fixture(params=["stories", "gpt2"])
def loaded(request: pytest.FixtureRequest) -> Loaded:
    """Each model family in turn: rotary (Llama) and absolute (GPT-2) positions."""
    value: Loaded = request.getfixturevalue(request.param)
    return value


@pytest.fixture(autouse=True)
def poisoned_cache_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh key and value buffers of the slot cache are full of NaN in every engine
    test, as uninitialized memory may be: a position in view that the cache forgot to
    zero then turns a row's output into NaN and its tokens differ from generate's."""
    from worker.engine import kvcache

    def nan_filled(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
        return like.new_full(shape, float("nan"))

    monkeypatch.setattr(kvcache, "uninitialized", nan_filled)


@pytest.fixture
def make_engine() -> Iterator[Any]:
    """Build BatchingEngines that are closed after the test."""
    from worker.engine.batching import BatchingEngine

    engines: list[BatchingEngine] = []

    def make(loaded: Loaded, **options: Any) -> BatchingEngine:
        model, tokenizer, info = loaded
        engine = BatchingEngine(model, tokenizer, info, **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
