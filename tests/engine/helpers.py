"""Small helpers shared by the engine tests."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
import torch

from core.schemas import GenerationParams
from worker.engine.base import GenerationRequest

_ids = itertools.count()


def request(prompt: str, seed: int = 0, **params: Any) -> GenerationRequest:
    """A request with a fresh id."""
    return GenerationRequest(
        id=f"r{next(_ids)}", prompt=prompt, params=GenerationParams(**params), seed=seed
    )


def reference(loaded: Any, prompt: str, seed: int | None = None, **kwargs: Any) -> list[str]:
    """What ``model.generate`` makes for ``prompt`` alone, as engine-style outputs."""
    model, tokenizer, _ = loaded
    ids = tokenizer(prompt, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**ids, pad_token_id=tokenizer.pad_token_id, **kwargs)
    prefix = tokenizer.decode(ids.input_ids[0], skip_special_tokens=True)
    texts = []
    for row in out:
        full = tokenizer.decode(row, skip_special_tokens=True)
        assert full.startswith(prefix)
        texts.append(full[len(prefix) :])
    return texts


def wait_for_tokens(engine: Any, request_id: str, tokens: int, timeout: float = 10.0) -> None:
    """Block until the request has generated at least ``tokens`` tokens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = engine.progress(request_id)
        if progress is not None and progress.tokens >= tokens:
            return
        time.sleep(0.002)
    raise AssertionError(f"{request_id} did not reach {tokens} tokens")


def mkldnn_calls(monkeypatch: pytest.MonkeyPatch, op: str = "_linear_pointwise") -> list[str]:
    """The name of the thread of every call of ``torch.ops.mkldnn.<op>`` from now on (the
    packed kernel, or ``_reorder_linear_weight``: a weight packed), until the test ends."""
    kernel = getattr(torch.ops.mkldnn, op)
    threads: list[str] = []

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return kernel(*args)

    monkeypatch.setattr(torch.ops.mkldnn, op, spy)
    return threads
