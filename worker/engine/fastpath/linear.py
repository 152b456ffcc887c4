"""Matrix products of a decode step, with weights packed once for oneDNN's kernels.

For bf16 and fp16 the CPU's oneDNN kernels (AMX, AVX512-BF16) want weights in their
own blocked layout; ``functional.linear`` reorders them on every call, which costs about as much
as the product itself at decode batch sizes. :func:`linear` packs a layer's weight once
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does) and calls
the packed kernel.

fp32 is packed too when asked (``fp32``; the engine's ``pack_fp32``, the worker's
``GENQ_FP32_PRODUCTS=packed``): ``generate``'s fp32 products are MKL's
(``functional.linear``), which on an AMD CPU with AVX-512 ran at a third of the packed
kernel's speed (bench/README.md). The packed kernel sums in another order, so its
logits differ from the model's own in the last bits (a few millionths of their scale).
MKL's own sums already differ with the batch's size: a row's result in a batch of 1-11
rows is not its result in a larger one (measured on GPT-2's shapes), while the packed
kernel gave each row the same bits at every batch size (one row of the 3,072-wide
product aside). Greedy tokens are ``generate``'s either way unless two candidates tie to
within those last bits (tests/engine/test_fastpath.py checks both kernels).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional

Linear = Callable[[torch.Tensor], torch.Tensor]

_PACKABLE = (torch.bfloat16, torch.float16)
_X86_64 = ("x86_64", "amd64")


def can_pack(weight: torch.Tensor, *, fp32: bool = False) -> bool:
    """Whether ``weight`` gets oneDNN's packed kernel: bf16/fp16 on a CPU with them, and
    fp32 on an x86-64 CPU if ``fp32`` (else fp32 keeps the model's own product: on other
    CPUs, ARM's say, the packed kernel's speed against the model's is unmeasured)."""
    if weight.device.type != "cpu":
        return False
    if weight.dtype not in _PACKABLE and not (fp32 and weight.dtype == torch.float32):
        return False
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    if weight.dtype == torch.float32:
        return platform.machine().lower() in _X86_64
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


# Activations oneDNN applies inside the product (a post-op): the hidden layer is then
# written once instead of being read and written by each elementwise op of the formula.
# ``name: (post-op, algorithm)``, the names being transformers' ``ACT2FN`` keys.
FUSED_ACTIVATIONS = {
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu": ("gelu", "none"),
    "silu": ("swish", ""),
}


def packed(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    max_rows: int,
    activation: str = "none",
    *,
    fp32: bool = False,
) -> Linear:
    """``act(x @ weight.T + bias)`` for a ``[out, in]`` weight, packed once where
    :func:`can_pack` (``fp32`` as there); ``activation`` is a key of
    :data:`FUSED_ACTIVATIONS` (packed weights only) or ``none``."""
    if not can_pack(weight, fp32=fp32):
        if activation != "none":
            raise ValueError("activations are fused only into packed products")
        return lambda x: functional.linear(x, weight, bias)
    post_op, algorithm = FUSED_ACTIVATIONS.get(activation, ("none", ""))
    packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max_rows)
    detached_bias = None if bias is None else bias.detach()

    def call(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            flat, packed_weight, detached_bias, post_op, [], algorithm
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    return call


def linear(module: Any, max_rows: int, activation: str = "none", *, fp32: bool = False) -> Linear:
    """A callable for ``module``: an ``nn.Linear`` or transformers' ``Conv1D``
    (GPT-2's layers, whose weight is stored ``[in, out]``), with ``activation`` fused
    (see :func:`fuses`); ``fp32`` as in :func:`can_pack`."""
    weight: torch.Tensor = module.weight
    bias: torch.Tensor | None = module.bias
    if type(module).__name__ == "Conv1D":
        if not can_pack(weight, fp32=fp32):
            return module  # type: ignore[no-any-return]  # addmm, exactly as the model does
        weight = weight.t().contiguous()
    elif not isinstance(module, torch.nn.Linear):
        raise TypeError(f"not a linear layer: {type(module).__name__}")
    return packed(weight, bias, max_rows, activation, fp32=fp32)


def fuses(module: Any, activation: str, *, fp32: bool = False) -> bool:
    """Whether :func:`linear` can fuse ``activation`` into ``module``'s product: packed
    weights (:func:`can_pack`, ``fp32`` as there; unpacked fp32 keeps the model's own
    activation, exactly) and a known one."""
    return activation in FUSED_ACTIVATIONS and can_pack(module.weight, fp32=fp32)
