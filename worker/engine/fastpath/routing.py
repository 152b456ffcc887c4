"""The model's own forward through a fast step's packed products, on one thread.

A fast decode step packs the weights of a bf16/fp16 model once for the CPU's oneDNN
kernels (:mod:`worker.engine.fastpath.linear`); the model's own forward, which the
engine uses for prefills, reorders every weight again on every call. :func:`route`
sends the model's modules to the step's packed callables instead (no second copy of
the weights): in a bf16 prefill of a few hundred prompt tokens on two cores that made
the forward 10-20% faster (bench/README.md). Only calls on the engine's scheduler thread
are routed: any other thread running the same model (a test's ``generate``) gets the
model's own modules, untouched. fp32 is never routed: its products stay the model's
own, so greedy fp32 outputs stay those of ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Packed = Callable[[torch.Tensor], torch.Tensor]


def route(
    pairs: Sequence[tuple[torch.nn.Module, Packed]], on_thread: Callable[[], bool]
) -> Callable[[], None]:
    """Make each module's forward call its packed callable while ``on_thread()`` holds
    (one positional tensor, as the model's layers call them); returns the undo."""
    for module, packed in pairs:
        own = module.forward

        def forward(*args: Any, _own: Any = own, _packed: Packed = packed, **kwargs: Any) -> Any:
            if len(args) == 1 and not kwargs and on_thread():
                return _packed(args[0])
            return _own(*args, **kwargs)

        module.forward = forward

    def undo() -> None:
        for module, _ in pairs:
            module.__dict__.pop("forward", None)

    return undo
