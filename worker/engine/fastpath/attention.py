"""Attention of one new token per row over the slot cache's window, in place."""

from __future__ import annotations

import torch
from torch.nn import functional

from worker.engine.kvcache import SlotCache


def step_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, 1, width]`` booleans (True: attend) from the step's int mask."""
    return mask.bool()[:, None, None, :]


def attend(
    batch: SlotCache,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write ``key``/``value`` (``[rows, kv_heads, 1, dim]``) at the window's end of
    layer ``layer``'s buffers and attend ``query`` (``[rows, heads, 1, dim]``) over the
    window plus that column; ``[rows, 1, heads * dim]``.

    The buffers are read through views (no copy, no concatenation); grouped-query
    attention is SDPA's own (``enable_gqa``), so keys are never repeated in memory.
    """
    slot = batch.layers[layer]
    keys, values = slot.key_buffer, slot.value_buffer
    assert keys is not None and values is not None
    w = batch.window
    keys[: w.rows, :, w.end : w.end + 1] = key
    values[: w.rows, :, w.end : w.end + 1] = value
    out = functional.scaled_dot_product_attention(
        query,
        keys[: w.rows, :, w.start : w.end + 1],
        values[: w.rows, :, w.start : w.end + 1],
        attn_mask=keep,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).reshape(query.shape[0], 1, -1)
