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
Route = tuple[Callable[[], bool], Packed]  # (is this the routed thread?, the product)
_ROUTES = "_genq_packed_routes"  # a routed module's routes, one per engine


def route(
    pairs: Sequence[tuple[torch.nn.Module, Packed]], on_thread: Callable[[], bool]
) -> Callable[[], None]:
    """Make each module's forward call its packed callable while ``on_thread()`` holds
    (one positional tensor, as the model's layers call them); returns the undo.

    Several engines may route one model (each its own thread): a module gets one
    dispatching ``forward`` holding every engine's route, and the last undo removes it.
    """
    added: list[tuple[torch.nn.Module, list[Route], Route]] = []
    for module, packed in pairs:
        routes: list[Route] | None = module.__dict__.get(_ROUTES)
        if routes is None:
            routes = []
            module.forward = _dispatcher(module.forward, routes)
            setattr(module, _ROUTES, routes)
        entry = (on_thread, packed)
        routes.append(entry)
        added.append((module, routes, entry))

    def undo() -> None:
        for module, routes, entry in added:
            if entry in routes:
                routes.remove(entry)
            if not routes and module.__dict__.get(_ROUTES) is routes:
                del module.forward
                delattr(module, _ROUTES)

    return undo


def _dispatcher(own: Callable[..., Any], routes: list[Route]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:
            for on_thread, packed in tuple(routes):  # another engine may close meanwhile
                if on_thread():
                    return packed(args[0])
        return own(*args, **kwargs)

    return forward
