"""The model's own activation, computed in place where that gives the same bits.

transformers' ``gelu_new`` (GPT-2's activation, ``NewGELUActivation``) is a formula of
eight elementwise operations, each writing a fresh tensor: at 128 rows of GPT-2 that is
eight ``[128, 3072]`` float32 tensors (1.5 MB each) allocated, faulted in and freed per
layer. The same operations on the same operands, written into two buffers
(multiplication and addition commute exactly in IEEE arithmetic, so swapping operands
changes no bit), give identical results for less memory traffic: 1.26x as fast at 128
rows, 2.2x at a prefill's 384, on 2 cores; a whole decode step of GPT-2 in fp32 at 128
rows 1.026x (bench/README.md, "Issue 13, session 23").

Used where the activation is not fused into a packed product (fp32 with the model's own
products, ``GENQ_FP32_PRODUCTS=model``), where the step must compute the model's bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_new_in_place(x: torch.Tensor) -> torch.Tensor:
    """``0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``, as
    ``NewGELUActivation`` computes it, operation for operation, in two new buffers."""
    out = torch.pow(x, 3.0)
    out.mul_(0.044715).add_(x).mul_(_SQRT_2_OVER_PI).tanh_().add_(1.0)
    return out.mul_(0.5 * x)


# The activation modules whose formula is rewritten in place, by class name.
_IN_PLACE = {"NewGELUActivation": gelu_new_in_place}


def activation(module: Any) -> Activation:
    """A callable computing what the activation ``module`` computes, bit for bit: the
    in-place form where there is one, else the module itself."""
    rewritten = _IN_PLACE.get(type(module).__name__)
    return rewritten if rewritten is not None else module
