"""A call between two decoder layers of the model's own forward, for any causal LM.

The fast decode steps (:mod:`worker.engine.fastpath`) call their ``between_layers``
themselves. Every other forward of the main lane goes through the model: prefills
(hundreds of prompt tokens at once) and, for models without a fast step, decode steps.
:func:`call_between_layers` hooks the model's decoder layers so that the engine's
callback runs after each of them but the last; the callback decides whether anything
is to be done (it is called in every forward of the model, the express lane's too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers in order: its first ``ModuleList`` holding
    ``config.num_hidden_layers`` modules (GPT-2's ``transformer.h``, Llama's
    ``model.layers``), or none when it has no such list."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return []


def call_between_layers(model: Any, callback: Callable[[], None]) -> list[RemovableHandle]:
    """Call ``callback`` after every decoder layer of ``model`` but the last, in every
    forward; the handles remove the hooks."""

    def after_layer(*_: Any) -> None:
        callback()

    return [layer.register_forward_hook(after_layer) for layer in decoder_layers(model)[:-1]]
