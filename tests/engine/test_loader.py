"""Loading: clear errors for a missing model, reproducibility records for a local one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.tiny_model import tiny_model_dir
from worker.engine.loader import ModelLoadError, load_model, weights_digest


def test_missing_model_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub reads the variable at import; without this it would retry the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model(Settings(model="definitely-not-a-model-xyz", torch_threads=1))
    message = str(info.value)
    assert "definitely-not-a-model-xyz" in message
    assert "GENQ_MODEL" in message and "local directory" in message


def test_local_dir_info(stories: Any, models_dir: Path) -> None:
    model, tokenizer, info = stories
    directory = tiny_model_dir(models_dir)
    assert info.revision == weights_digest(directory)
    assert len(info.revision) == 16
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.context_length == model.config.max_position_embeddings
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_gpt2_context_from_n_positions(gpt2: Any) -> None:
    model, _, info = gpt2
    assert info.context_length == model.config.n_positions
