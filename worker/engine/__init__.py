"""The model engine: one per worker process, shared by every task.

``build_engine`` picks the engine from settings; ``GENQ_MODEL=fake`` gives the
deterministic :class:`~worker.engine.fake.FakeEngine` without importing torch.
"""

from __future__ import annotations

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
    from worker.engine.batching import BatchingEngine
    from worker.engine.loader import ModelLoadError, load_model, torch_threads

    # Only the engine's scheduler thread runs the model with several threads; this one
    # loads it with one. GNU OpenMP (torch's CPU threads) gives every thread that runs
    # parallel work a team of its own, and once the teams' threads outnumber the CPUs
    # their threads stop spinning between parallel regions and sleep instead: a team
    # made here while loading slowed each of the engine's forwards by about 12%.
    model, tokenizer, info = load_model(settings, threads=1)
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
        )
    except ValueError as exc:  # a cache layout the engine cannot batch
        raise ModelLoadError(f"cannot serve {settings.model!r}: {exc}") from exc
