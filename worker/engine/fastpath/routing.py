"""The model's own forward through a fast step's packed products, on one thread.

A fast decode step packs the weights of a bf16/fp16 model once for the CPU's oneDNN
kernels (:mod:`worker.engine.fastpath.linear`); the model's own forward, which the
engine uses for prefills, reorders every weight again on every call. :func:`route`
sends the model's modules to the step's packed callables instead (no second copy of
the weights): in bf16 on two cores the engine's prefills of a few hundred prompt tokens
ran 1.33x as fast (bench/README.md). Only calls on the engine's scheduler thread
are routed: any other thread running the same model (a test's ``generate``) gets the
model's own modules, untouched. fp32 products are routed only where the step packed them
(``GENQ_FP32_PRODUCTS=packed``); otherwise they stay the model's own, and what is routed
in fp32 computes the same bits (GPT-2's activation in place,
:mod:`worker.engine.fastpath.activation`).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from worker.engine.fastpath.linear import Linear

Route = tuple[Callable[[], bool], Linear]  # (is this the routed thread?, the product)
_routes: weakref.WeakKeyDictionary[torch.nn.Module, list[Route]] = weakref.WeakKeyDictionary()


def route(
    pairs: Sequence[tuple[torch.nn.Module, Linear]], on_thread: Callable[[], bool]
) -> Callable[[], None]:
    """Make each module's forward call its packed product while ``on_thread()`` holds
    (one positional tensor, as the model's layers call them); returns the undo.

    A pair whose product is the module itself (nothing packed) is left alone, as is a
    module whose instance already has a forward of someone else's."""
    added: list[tuple[torch.nn.Module, Route]] = []
    for module, packed in pairs:
        own = module.__dict__.get("forward")
        if packed is module or (own is not None and not _is_ours(own)):
            continue
        entry = (on_thread, packed)
        _routes.setdefault(module, []).append(entry)
        module.forward = types.MethodType(_forward, module)
        added.append((module, entry))

    def undo() -> None:
        while added:
            module, entry = added.pop()
            routes = _routes.get(module, [])
            if entry in routes:
                routes.remove(entry)
            if not routes:
                _routes.pop(module, None)
                if _is_ours(module.__dict__.get("forward")):
                    del module.forward

    return undo


def _forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    if len(args) == 1 and not kwargs:
        for on_thread, packed in tuple(_routes.get(self, ())):  # an engine may close meanwhile
            if on_thread():
                return packed(args[0])
    return type(self).forward(self, *args, **kwargs)


def _is_ours(forward: Any) -> bool:
    return getattr(forward, "__func__", None) is _forward
