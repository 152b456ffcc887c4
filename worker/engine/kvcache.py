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


def _layers(cache: Any) -> Iterator[Any]:
    """The layers that hold key/value tensors (KV-sharing layers may hold none)."""
    for layer in cache.layers:
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
        old.keys = torch.cat(
            [_pad_left(old.keys, length - run_len), _pad_left(new.keys, length - new_len)], dim=0
        )
        old.values = torch.cat(
            [_pad_left(old.values, length - run_len), _pad_left(new.values, length - new_len)],
            dim=0,
        )
    return running


def select_rows(cache: Any, rows: torch.Tensor, drop_left: int = 0) -> None:
    """Keep only ``rows`` (int64 indices) and drop the first ``drop_left`` columns, in place."""
    for layer in _layers(cache):
        keys, values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        if drop_left:
            # contiguous(): a sliced view would keep the dropped memory alive and
            # make the next torch.cat copy a strided tensor.
            keys, values = (
                keys[:, :, drop_left:].contiguous(),
                values[:, :, drop_left:].contiguous(),
            )
        layer.keys, layer.values = keys, values


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
