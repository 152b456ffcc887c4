"""Loading: clear errors for a missing model, reproducibility records for a local one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.tiny_model import tiny_gpt2_dir, tiny_model_dir
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


def test_a_model_the_engine_cannot_batch_is_refused_with_a_clear_error(
    models_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from worker.engine import build_engine

    target = tmp_path / "tiny-sliding-mistral"
    shutil.copytree(tiny_gpt2_dir(models_dir), target)  # its tokenizer
    for weights in target.glob("*.safetensors"):
        weights.unlink()
    config = MistralConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(target)),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    )
    MistralForCausalLM(config).save_pretrained(target)
    with pytest.raises(ModelLoadError) as info:
        build_engine(Settings(model=str(target), torch_threads=1))
    assert str(target) in str(info.value) and "sliding-window" in str(info.value)
