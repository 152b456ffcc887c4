"""Decode steps written on a model's own modules, for the architectures that have one.

transformers' forward is general: it builds a 4-D mask, walks its cache objects and
computes logits through layers written for every use. A decode step of the running batch
needs far less: embed one token per row, write each layer's new key and value in place
into the :class:`~worker.engine.kvcache.SlotCache` buffers, attend over the filled window
with one SDPA call, and project the last hidden state. :func:`decode_step_for` returns
such a step for GPT-2 and Llama models (the families of the test models; each checked
token for token against ``generate`` in fp32, with its products packed and with the
model's own), and ``None`` for every other model, which keeps the engine's generic path
(the model's own forward).

The steps read and write the same buffers as the generic path, so prefill, admission,
retirement, compaction and any reordering of rows are shared and unchanged.

Between two layers a step calls its ``between_layers`` (when set): the engine gives a
short request that arrived meanwhile its turn there (:mod:`worker.engine.lanes`), on
another slot cache, instead of after the whole step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol

import torch

from worker.engine.fastpath.attention import Products
from worker.engine.fastpath.linear import Linear
from worker.engine.kvcache import SlotCache


class DecodeStep(Protocol):
    """One decode forward of every row in view; returns ``[rows, vocab]`` float32 logits.

    The arguments are :meth:`SlotCache.step_inputs`; the step writes the new column of
    keys and values at the window's end (as the generic path's cache layers do), and
    :meth:`SlotCache.advance` takes it into view afterwards.
    """

    batch: SlotCache
    between_layers: Callable[[], None] | None
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    products: Products | None
    """The attention over whole cache rows (None: the eager products; see
    :func:`~worker.engine.fastpath.attention.attend`)."""
    packed: bool
    """Whether the matrix products run on weights packed once for oneDNN
    (:mod:`worker.engine.fastpath.linear`) rather than the model's own."""

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor: ...

    def packed_modules(self) -> list[tuple[torch.nn.Module, Linear]]:
        """The model's own modules with the packed products that compute the same, for
        :func:`~worker.engine.fastpath.routing.route` (empty when nothing is packed)."""
        ...


def decode_step_for(
    model: Any, batch: SlotCache, *, max_rows: int, pack_fp32: bool = False
) -> DecodeStep | None:
    """A fast decode step for ``model`` over ``batch``, or ``None`` (use the generic path).

    ``max_rows`` is the largest running batch, the row count packed weights are tuned for;
    with ``pack_fp32`` an fp32 model's weights are packed too
    (:mod:`worker.engine.fastpath.linear`), else its products are the model's own.
    """
    from worker.engine.fastpath import gpt2, llama

    for family in (gpt2, llama):
        if family.supports(model):
            step: DecodeStep = family.build(model, batch, max_rows, pack_fp32=pack_fp32)
            return step
    return None


def rebind(step: DecodeStep, batch: SlotCache) -> DecodeStep:
    """``step`` over another slot cache, sharing its packed weights."""
    other = copy.copy(step)
    other.batch = batch
    other.between_layers = None
    return other


__all__ = ["DecodeStep", "decode_step_for", "rebind"]
