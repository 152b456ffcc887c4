"""Load the served model and tokenizer once per worker process.

``load_model`` resolves ``device`` and ``dtype`` from settings, fixes the torch
thread count, prepares the tokenizer for left-padded batches and records what
is needed to reproduce a result (:class:`~worker.engine.base.ModelInfo`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.settings import Settings
from worker.engine.base import ModelInfo

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelLoadError(RuntimeError):
    """The model or its tokenizer could not be loaded; the message says what to set."""


def resolve_device(device: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# CPU features that give bf16 matrix products natively (AVX512-BF16 dot products,
# AMX tiles); without them oneDNN emulates bf16 and fp32 is faster.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with Path("/proc/cpuinfo").open() as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively and torch's oneDNN kernels can use it."""
    if not NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags):
        return False
    mkldnn: Any = torch.backends.mkldnn
    return bool(mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` picks half precision where the hardware has it natively, as vLLM's
    ``auto`` does: bf16 on CUDA (fp16 where the GPU has no bf16) and on CPUs with
    AVX512-BF16 or AMX; fp32 elsewhere (emulated bf16 is slower than fp32). bf16
    tokens can differ from fp32's; the job's reproducibility record names the dtype."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)  # not emulated
        return torch.bfloat16 if native else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def physical_cores() -> int:
    """Physical cores (not hyperthreads): torch's matmuls do not gain from SMT siblings."""
    try:
        cores: set[tuple[str, str]] = set()
        physical = core = ""
        with Path("/proc/cpuinfo").open() as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                    cores.add((physical, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


def weights_digest(directory: Path) -> str:
    """The first 16 hex chars of a sha256 over the weight files (names and bytes)."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    )
    for path in files:
        digest.update(path.relative_to(directory).as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def context_length(config: Any, default: int = 2048) -> int:
    """The longest sequence the model takes, from its config."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _hub_revision(name: str, config: Any) -> str:
    """The hub commit the files came from: the config records it in most versions,
    else the snapshot folder of the local hub cache is named after it."""
    commit = getattr(config, "_commit_hash", None)
    if isinstance(commit, str) and commit:
        return commit
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a revision is a record, never a reason to fail loading
        return "unknown"
    if isinstance(cached, str) and "/snapshots/" in cached:
        return Path(cached).parent.name
    return "unknown"


def torch_threads(settings: Settings) -> int:
    """Threads for the model's work: ``GENQ_TORCH_THREADS``, else one per physical core
    (torch's default, all logical CPUs, oversubscribes hyperthreads and competing
    worker processes)."""
    return settings.torch_threads or physical_cores()


def load_model(settings: Settings) -> tuple[Any, Any, ModelInfo]:
    """Load ``settings.model`` (a hub name or a local directory) for generation.

    Returns the model (eval mode, on its device), the tokenizer (left padding, a
    pad token) and the :class:`ModelInfo`. Raises :class:`ModelLoadError` with a
    hint about ``GENQ_MODEL`` when the model cannot be found. Sets torch's threads to
    :func:`torch_threads` (this thread's, and the default of threads started later).
    """
    torch.set_num_threads(torch_threads(settings))
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    name = settings.model
    local = Path(name).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model: Any = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model {name!r} (hub unreachable or not found:"
            f" {exc.__class__.__name__})."
            " Set GENQ_MODEL to a local directory holding config.json, the weights and the"
            f" tokenizer, e.g. GENQ_MODEL=/models/{local.name or 'gpt2'}"
        ) from exc
    model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    revision = weights_digest(local) if local.is_dir() else _hub_revision(name, model.config)
    info = ModelInfo(
        name=settings.model_id,  # the one id it is queued and listed under
        revision=revision,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        context_length=context_length(model.config),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
    return model, tokenizer, info
