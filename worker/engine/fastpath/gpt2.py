"""The decode step for GPT-2 (``GPT2LMHeadModel``): learned absolute positions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from worker.engine.fastpath.activation import Activation, activation
from worker.engine.fastpath.attention import Products, attend, step_mask
from worker.engine.fastpath.linear import Linear, can_pack, fuses, linear
from worker.engine.kvcache import SlotCache


def supports(model: Any) -> bool:
    """GPT-2 with the options its step reproduces (no cross-attention, no layer-wise
    scaling, no upcast-and-reorder attention)."""
    config = model.config
    return (
        type(model).__name__ == "GPT2LMHeadModel"
        and not getattr(config, "add_cross_attention", False)
        and not config.scale_attn_by_inverse_layer_idx
        and not config.reorder_and_upcast_attn
    )


class GPT2Step:
    """One token for every row: the model's own embeddings, norms and MLPs, with the
    attention written on the slot cache and the weights packed (bf16/fp16; fp32 with
    ``pack_fp32``, else fp32's products are the model's own)."""

    def __init__(
        self, model: Any, batch: SlotCache, max_rows: int, *, pack_fp32: bool = False
    ) -> None:
        self.batch = batch
        # Whether the products run on packed weights (fp32 too with pack_fp32; else the
        # model's own): the job's reproducibility record.
        self.packed = can_pack(model.lm_head.weight, fp32=pack_fp32)
        product = functools.partial(linear, max_rows=max_rows, fp32=pack_fp32)
        self.between_layers: Callable[[], None] | None = None
        self.body = model.transformer
        config = model.config
        self.heads = self.kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.width = config.n_embd
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        # Attention over whole cache rows (bf16/fp16 on a CPU); None: the eager products.
        self.products: Products | None = None
        self.qkv: list[Linear] = [product(b.attn.c_attn) for b in self.body.h]
        self.proj: list[Linear] = [product(b.attn.c_proj) for b in self.body.h]
        # With packed weights the activation runs inside the first MLP product (one kernel
        # instead of eight elementwise ones); else it is the model's own, exactly.
        act = config.activation_function
        self.fused_act = fuses(self.body.h[0].mlp.c_fc, act, fp32=pack_fp32)
        fc_act = act if self.fused_act else "none"
        self.fc: list[Linear] = [product(b.mlp.c_fc, activation=fc_act) for b in self.body.h]
        self.fc_out: list[Linear] = [product(b.mlp.c_proj) for b in self.body.h]
        self.act: list[Activation] = [activation(b.mlp.act) for b in self.body.h]
        self.lm_head = product(model.lm_head)
        self._lm_head_module = model.lm_head

    def packed_modules(self) -> list[tuple[torch.nn.Module, Linear]]:
        """The model's modules this step computes otherwise, each with the callable
        computing the same (:func:`~worker.engine.fastpath.routing.route`): the packed
        products (:func:`can_pack`), and unpacked the activation computed in place, bit for bit."""
        pairs: list[tuple[torch.nn.Module, Linear]] = []
        if not self.fused_act:
            pairs += [(b.mlp.act, act) for b, act in zip(self.body.h, self.act, strict=True)]
        if not self.packed:
            return pairs
        pairs.append((self._lm_head_module, self.lm_head))
        for i, block in enumerate(self.body.h):
            pairs += [(block.attn.c_attn, self.qkv[i]), (block.attn.c_proj, self.proj[i])]
            if self.fused_act:  # the activation is inside fc: the whole MLP at once
                pairs.append((block.mlp, _chained(self.fc[i], self.fc_out[i])))
            else:
                pairs += [(block.mlp.c_fc, self.fc[i]), (block.mlp.c_proj, self.fc_out[i])]
        return pairs

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``[rows, vocab]`` float32 logits of the next token of every row."""
        rows, heads, dim = ids.shape[0], self.heads, self.head_dim
        keep = step_mask(self.batch, mask)
        # The residual stream is this step's own tensor: added to in place (the same sums
        # as ``h = h + ...``, without a fresh tensor per add; 1.03x a step, bench/README.md).
        h = self.body.wte(ids) + self.body.wpe(positions)
        for i, block in enumerate(self.body.h):
            q, k, v = torch.split(self.qkv[i](block.ln_1(h)), self.width, dim=2)
            attn = attend(
                self.batch,
                i,
                q.view(rows, 1, heads, dim).transpose(1, 2),
                k.view(rows, 1, heads, dim).transpose(1, 2),
                v.view(rows, 1, heads, dim).transpose(1, 2),
                keep,
                self.scale,
                self.products,
            )
            h.add_(self.proj[i](attn))
            hidden = self.fc[i](block.ln_2(h))
            if not self.fused_act:
                hidden = self.act[i](hidden)
            h.add_(self.fc_out[i](hidden))
            if self.between_layers is not None and i + 1 < len(self.body.h):
                self.between_layers()
        logits: torch.Tensor = self.lm_head(self.body.ln_f(h)[:, -1])
        return logits.float()


def _chained(first: Linear, second: Linear) -> Linear:
    return lambda x: second(first(x))


def build(model: Any, batch: SlotCache, max_rows: int, *, pack_fp32: bool = False) -> GPT2Step:
    """The step for ``model`` (see :func:`supports`); ``pack_fp32`` as in the step."""
    return GPT2Step(model, batch, max_rows, pack_fp32=pack_fp32)
