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


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: bf16 on a CPU with AVX512-BF16 or AMX (and oneDNN bf16 kernels), else fp32;
    a named dtype is taken as named."""
    import torch

    from worker.engine import loader

    cpu = torch.device("cpu")
    for flags, native in [
        ({"avx512f", "avx512_bf16"}, True),
        ({"avx512f", "amx_bf16", "amx_tile"}, True),
        ({"avx512f", "avx2"}, False),
        (set(), False),
    ]:
        monkeypatch.setattr(loader, "cpu_flags", lambda flags=flags: frozenset(flags))
        kernels = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        expected = torch.bfloat16 if native and kernels else torch.float32
        assert loader.resolve_dtype("auto", cpu) == expected, flags
        assert loader.resolve_dtype("float32", cpu) == torch.float32
        assert loader.resolve_dtype("bfloat16", cpu) == torch.bfloat16


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    from worker.engine.loader import cpu_flags

    flags = cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags and all(" " not in f for f in flags)
    else:
        assert flags == frozenset()


def test_auto_dtype_is_recorded(models_dir: Path) -> None:
    """The ModelInfo (the job's reproducibility record) names the dtype auto chose."""
    import torch

    from worker.engine.loader import load_model, resolve_dtype

    _, _, info = load_model(Settings(model=str(tiny_gpt2_dir(models_dir)), torch_threads=1))
    chosen = resolve_dtype("auto", torch.device("cpu"))
    assert info.dtype == str(chosen).removeprefix("torch.")


def test_only_the_engines_thread_runs_the_model_with_several_threads(models_dir: Path) -> None:
    """build_engine leaves the calling thread at one torch thread (it never starts a
    team of OpenMP threads of its own), loads the model on a thread that is gone once
    the engine runs, and the engine's scheduler runs the model with GENQ_TORCH_THREADS:
    two live teams on a machine of that many cores make OpenMP's threads sleep between
    parallel regions instead of spinning."""
    import threading

    import torch

    from tests.engine.helpers import request
    from worker.engine import build_engine

    before = torch.get_num_threads()
    engine: Any = build_engine(
        Settings(
            model=str(tiny_gpt2_dir(models_dir)),
            torch_threads=3,
            share_cores=False,
            compile_attention=False,  # no compiling thread beside the engine's
        )
    )
    seen: list[int] = []
    hook = engine.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        engine.submit(request("Once upon a time", max_new_tokens=2)).result(timeout=60)
        assert torch.get_num_threads() == 1  # this thread runs no model work
        assert not [t for t in threading.enumerate() if t.name.startswith("genq-load")]
        assert seen and set(seen) == {3}  # the scheduler's forwards
    finally:
        hook.remove()
        engine.close()
        torch.set_num_threads(before)


@pytest.mark.parametrize(("products", "packed"), [(None, True), ("model", False)])
def test_fp32_products_setting_reaches_the_engines_kernels(
    models_dir: Path, products: str | None, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GENQ_FP32_PRODUCTS``: a worker's engine runs oneDNN's packed kernel by default,
    the model's own products (never that kernel) with ``model``."""
    import torch

    from tests.engine.helpers import mkldnn_calls, request
    from worker.engine import build_engine
    from worker.engine.fastpath.linear import can_pack

    if not can_pack(torch.ones(1), fp32=True):
        pytest.skip("torch has no oneDNN here, or this is not an x86-64 CPU")
    calls = mkldnn_calls(monkeypatch)

    options: dict[str, Any] = {} if products is None else {"fp32_products": products}
    settings = Settings(
        model=str(tiny_gpt2_dir(models_dir)),
        dtype="float32",
        torch_threads=1,
        compile_attention=False,
        **options,
    )
    engine: Any = build_engine(settings)
    try:
        engine.submit(request("Once upon a time", max_new_tokens=3)).result(timeout=60)
        assert engine.info.products == ("packed" if packed else "model")  # the jobs' record
    finally:
        engine.close()
    assert bool(calls) is packed


def test_an_unknown_fp32_products_value_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_FP32_PRODUCTS", "fastest")
    with pytest.raises(ValueError, match="fp32_products"):
        Settings()
