"""Matrix products of a decode step, with weights packed once where that is exact.

For bf16 and fp16 the CPU's oneDNN kernels (AMX, AVX512-BF16) want weights in their
own blocked layout; ``functional.linear`` reorders them on every call, which costs about as much
as the product itself at decode batch sizes. :func:`linear` packs a layer's weight once
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does) and calls
the packed kernel. fp32 keeps ``functional.linear``: its packed kernel sums in another order, and
greedy fp32 outputs must stay token for token those of ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional

Linear = Callable[[torch.Tensor], torch.Tensor]

_PACKABLE = (torch.bfloat16, torch.float16)


def _can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dtype not in _PACKABLE:
        return False
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def packed(weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> Linear:
    """``x @ weight.T + bias`` for a ``[out, in]`` weight, packed once when that pays."""
    if not _can_pack(weight):
        return lambda x: functional.linear(x, weight, bias)
    packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max_rows)
    detached_bias = None if bias is None else bias.detach()

    def call(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            flat, packed_weight, detached_bias, "none", [], ""
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    return call


def linear(module: Any, max_rows: int) -> Linear:
    """A callable for ``module``: an ``nn.Linear`` or transformers' ``Conv1D``
    (GPT-2's layers, whose weight is stored ``[in, out]``)."""
    weight: torch.Tensor = module.weight
    bias: torch.Tensor | None = module.bias
    if type(module).__name__ == "Conv1D":
        if not _can_pack(weight):
            return module  # type: ignore[no-any-return]  # addmm, exactly as the model does
        weight = weight.t().contiguous()
    elif not isinstance(module, torch.nn.Linear):
        raise TypeError(f"not a linear layer: {type(module).__name__}")
    return packed(weight, bias, max_rows)
