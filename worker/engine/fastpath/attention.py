"""Attention of one new token per row over the slot cache's window, in place."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional

from worker.engine.kvcache import SlotCache

_LOW_PRECISION = (torch.bfloat16, torch.float16)

Products = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def whole_rows_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`attend` reads whole rows of buffers on ``device`` in ``dtype``
    (bf16/fp16 on a CPU, see :func:`products_attention`)."""
    return device.type == "cpu" and dtype in _LOW_PRECISION


def reads_whole_rows(batch: SlotCache) -> bool:
    """Whether :func:`attend` reads every column of the rows in view rather than the
    window's (:func:`whole_rows_for` the cache's buffers)."""
    buffer = next(layer.key_buffer for layer in batch.layers if layer.key_buffer is not None)
    return whole_rows_for(buffer.device, buffer.dtype)


def step_mask(batch: SlotCache, mask: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, 1, columns]`` booleans (True: attend) from the step's int mask over
    the window, or from the cache's own mask over every column where :func:`attend`
    reads whole rows (a live row attends to nothing outside the window)."""
    if reads_whole_rows(batch):
        assert batch.mask is not None
        mask = batch.mask[: batch.window.rows]
    return mask.bool()[:, None, None, :]


def attend(
    batch: SlotCache,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    products: Products | None = None,
) -> torch.Tensor:
    """Write ``key``/``value`` (``[rows, kv_heads, 1, dim]``) at the window's end of
    layer ``layer``'s buffers and attend ``query`` (``[rows, heads, 1, dim]``) over the
    window plus that column; ``[rows, 1, heads * dim]``.

    The buffers are read through views (no copy, no concatenation), and keys are never
    repeated in memory for grouped-query attention. Over whole rows the attention is
    ``products`` (:func:`products_attention` when None; the engine may give a compiled
    equivalent, :mod:`worker.engine.fastpath.compiled`).
    """
    slot = batch.layers[layer]
    keys, values = slot.key_buffer, slot.value_buffer
    assert keys is not None and values is not None
    w = batch.window
    keys[: w.rows, :, w.end : w.end + 1] = key
    values[: w.rows, :, w.end : w.end + 1] = value
    if reads_whole_rows(batch):
        products = products or products_attention
        out = products(query, keys[: w.rows], values[: w.rows], keep, scale)
    else:
        out = functional.scaled_dot_product_attention(
            query,
            keys[: w.rows, :, w.start : w.end + 1],
            values[: w.rows, :, w.start : w.end + 1],
            attn_mask=keep,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).reshape(query.shape[0], 1, -1)


def products_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA's result for one query column over whole rows of the buffers, as two
    batched matrix products with the softmax between them in float32:
    ``[rows, heads, 1, dim]``.

    On CPUs in bf16/fp16 this is 2-6x faster than SDPA over the window's views
    (measured at 128 rows, GPT-2's and a grouped-query shape; bench/README.md). The
    products need each (row, head)'s keys contiguous and evenly spaced: over a
    window's columns (a view spaced by the buffer's capacity) the bf16 kernels copy
    the whole window first, so they read every column the buffers hold instead, up to
    ``GROW_CHUNK + LEFT_ROOM`` more than the window, masked out. Masked columns get
    weight exactly 0, so their values must be finite: the slot cache keeps every value
    of a row in view finite (:mod:`worker.engine.kvcache`). A query group of
    grouped-query attention meets its one key head in one product. The scores are
    rounded to the keys' precision before the softmax, as transformers' eager
    attention does, but of the scaled query (SDPA's order), so that fp16 does not
    overflow before the scale.
    """
    rows, heads, _, dim = query.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    # [rows * kv_heads, group, dim] @ [rows * kv_heads, dim, width], the keys' views.
    # The query is scaled first, as SDPA does: a product rounded to fp16 before the
    # scale overflows (65504) where the scaled one does not.
    scores = torch.bmm(
        (query * scale).reshape(rows * kv_heads, group, dim),
        keys.reshape(rows * kv_heads, width, dim).transpose(1, 2),
    ).view(rows, kv_heads, group, width)
    weights = scores.float().masked_fill_(~keep, float("-inf")).softmax(-1)
    out = torch.bmm(
        weights.to(values.dtype).view(rows * kv_heads, group, width),
        values.reshape(rows * kv_heads, width, dim),
    )
    return out.view(rows, heads, 1, dim)
