"""Row surgery on a transformers ``DynamicCache`` for continuous batching.

The running batch keeps one cache whose tensors are ``[rows, heads, length, dim]``
and whose rows are left-padded (the padding is masked out by the attention mask).
Newcomers are prefilled as their own left-padded mini-batch and merged in by
padding the shorter cache on the left; finished rows are dropped with an index
select, and columns that became padding in every row are trimmed on the left.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Columns of headroom a growing layer allocates at once: the cache is copied once
# per GROW_CHUNK decode steps instead of at every step (torch.cat in DynamicLayer
# copies the whole cache per token, which dominates a CPU decode step at batch 64).
GROW_CHUNK = 64


class GrowingLayer(DynamicLayer):  # type: ignore[misc]
    """A DynamicLayer that writes new keys/values into preallocated headroom.

    ``keys``/``values`` are views of the first ``length`` columns of the buffers,
    so the model sees exactly what a DynamicLayer would show it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, headroom: int = GROW_CHUNK) -> None:
        """Take ``keys``/``values`` as the cache content, with room to grow."""
        rows, heads, length, dim = keys.shape
        shape = (rows, heads, length + headroom, dim)
        self.key_buffer = keys.new_empty(shape)
        self.value_buffer = values.new_empty(shape)
        self.key_buffer[:, :, :length] = keys
        self.value_buffer[:, :, :length] = values
        self.length = length
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]
        self.device = keys.device
        self.is_initialized = True

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new columns in place (growing by a chunk when full)."""
        if self.key_buffer is None or self.value_buffer is None:
            self.adopt(key_states, value_states)
            return self._views()
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            assert self.keys is not None and self.values is not None
            self.adopt(self.keys, self.values, headroom=max(GROW_CHUNK, end - self.length))
            assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Columns in use (not the buffer's capacity)."""
        return self.length


def new_cache(config: Any) -> DynamicCache:
    """A DynamicCache whose plain full-attention layers grow in chunks."""
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def _set(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, GrowingLayer):
        layer.adopt(keys, values)
    else:
        layer.keys, layer.values = keys, values


def _layers(cache: Any) -> Iterator[Any]:
    """The layers that hold key/value tensors (KV-sharing layers may hold none)."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            if layer.length > 0:
                yield layer
            continue
        initialized = getattr(layer, "is_initialized", False) and layer.keys is not None
        if initialized and layer.keys.numel() > 0:
            yield layer


def cache_length(cache: Any) -> int:
    """The sequence length of the cache (0 when empty)."""
    return int(cache.get_seq_length())


def _pad_left(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    # Zeros rather than garbage: padded positions are masked, but NaN * 0 would
    # still poison the attention output.
    return functional.pad(tensor, (0, 0, amount, 0)) if amount > 0 else tensor


def merge(running: Any, newcomers: Any) -> Any:
    """Append ``newcomers``' rows after ``running``'s, left-padding the shorter one.

    ``running`` is modified in place and returned.
    """
    run_len, new_len = cache_length(running), cache_length(newcomers)
    length = max(run_len, new_len)
    for old, new in zip(running.layers, newcomers.layers, strict=True):
        if not getattr(new, "is_initialized", False) or new.keys is None:
            continue
        keys = torch.cat(
            [_pad_left(old.keys, length - run_len), _pad_left(new.keys, length - new_len)], dim=0
        )
        values = torch.cat(
            [_pad_left(old.values, length - run_len), _pad_left(new.values, length - new_len)],
            dim=0,
        )
        _set(old, keys, values)
    return running


def select_rows(cache: Any, rows: torch.Tensor, drop_left: int = 0) -> None:
    """Keep only ``rows`` (int64 indices) and drop the first ``drop_left`` columns, in place."""
    for layer in _layers(cache):
        # index_select copies, so the dropped columns' memory is released.
        keys = layer.keys[:, :, drop_left:].index_select(0, rows)
        values = layer.values[:, :, drop_left:].index_select(0, rows)
        _set(layer, keys, values)


def pad_mask_left(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad a ``[rows, len]`` attention mask with zeros to ``length`` columns."""
    missing = length - mask.shape[1]
    return functional.pad(mask, (missing, 0)) if missing > 0 else mask


def leading_padding(mask: torch.Tensor) -> int:
    """How many leftmost columns are padding in every row."""
    used = mask.any(dim=0)
    if not bool(used.any()):
        return mask.shape[1]
    return int(torch.argmax(used.to(torch.int8)).item())
