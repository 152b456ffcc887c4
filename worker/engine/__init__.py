"""The model engine: one per worker process, shared by every task.

``build_engine`` picks the engine from settings; ``GENQ_MODEL=fake`` gives the
deterministic :class:`~worker.engine.fake.FakeEngine` without importing torch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from worker.engine.base import (
    Engine,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Progress,
)

if TYPE_CHECKING:
    from core.settings import Settings

__all__ = [
    "Engine",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "ModelInfo",
    "Progress",
    "build_engine",
]


def build_engine(settings: Settings) -> Engine:
    """Load the configured model and start its engine (slow: call once per process)."""
    if settings.model == "fake" or settings.model.startswith("fake:"):
        from worker.engine.fake import fake_engine_from_spec

        return fake_engine_from_spec(
            settings.model, settings.default_max_new_tokens, name=settings.model_id
        )
    # Imported here so that the fake engine (and the API) never import torch.
    import torch

    # The model runs on the engine's scheduler thread only, with GENQ_TORCH_THREADS. GNU
    # OpenMP (torch's CPU threads) gives every thread that runs parallel work a team of
    # its own, and once the live teams' threads outnumber the CPUs they sleep between
    # parallel regions instead of spinning: a second team (this thread's, had it loaded
    # the model) slowed each of the engine's forwards by about 12% on 2 cores. So this
    # thread keeps one torch thread, and the model is loaded (and its weights packed) on
    # a thread that ends when the engine has started: its team ends with it.
    torch.set_num_threads(1)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="genq-load") as loader:
        return loader.submit(_load_and_start, settings).result()


def _load_and_start(settings: Settings) -> Engine:
    from worker.engine.batching import BatchingEngine
    from worker.engine.loader import ModelLoadError, load_model, torch_threads

    model, tokenizer, info = load_model(settings)
    try:
        return BatchingEngine(
            model,
            tokenizer,
            info,
            max_batch_size=settings.max_batch_size,
            max_tokens_in_flight=settings.max_tokens_in_flight,
            default_max_new_tokens=settings.default_max_new_tokens,
            fast_decode=settings.fast_decode,
            express_max_new_tokens=settings.express_max_new_tokens,
            threads=torch_threads(settings),
            share_cores=settings.share_cores,
            compile_attention=settings.compile_attention,
            pack_fp32=settings.fp32_products == "packed",
        )
    except ValueError as exc:  # a cache layout the engine cannot batch
        raise ModelLoadError(f"cannot serve {settings.model!r}: {exc}") from exc
