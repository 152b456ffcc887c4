"""The decode step for Llama (``LlamaForCausalLM``): rotary positions, grouped-query
attention, RMSNorm and a gated MLP."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from worker.engine.fastpath.attention import Products, attend, step_mask
from worker.engine.fastpath.linear import Linear, can_pack, fuses, linear
from worker.engine.kvcache import SlotCache


def supports(model: Any) -> bool:
    """Llama itself (not a subclass with other attention); tensor-parallel pretraining
    slices (``pretraining_tp > 1``) are left to the generic path."""
    return (
        type(model).__name__ == "LlamaForCausalLM"
        and getattr(model.config, "pretraining_tp", 1) == 1
    )


class LlamaStep:
    """One token for every row: the model's own embeddings, rotary tables, norms and
    activation, with the attention written on the slot cache and packed weights."""

    def __init__(
        self, model: Any, batch: SlotCache, max_rows: int, *, pack_fp32: bool = False
    ) -> None:
        self.batch = batch
        # Whether the products run on packed weights (fp32 too with pack_fp32; else the
        # model's own): the job's reproducibility record.
        self.packed = can_pack(model.lm_head.weight, fp32=pack_fp32)
        product = functools.partial(linear, max_rows=max_rows, fp32=pack_fp32)
        self.between_layers: Callable[[], None] | None = None
        self.body = model.model
        layers = self.body.layers
        first = layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.scale = first.scaling
        # Attention over whole cache rows (bf16/fp16 on a CPU); None: the eager products.
        self.products: Products | None = None
        self.q = [product(layer.self_attn.q_proj) for layer in layers]
        self.k = [product(layer.self_attn.k_proj) for layer in layers]
        self.v = [product(layer.self_attn.v_proj) for layer in layers]
        self.o = [product(layer.self_attn.o_proj) for layer in layers]
        # With packed weights the gate's activation runs inside its product (see gpt2.py).
        act = getattr(model.config, "hidden_act", "")
        self.fused_act = fuses(layers[0].mlp.gate_proj, act, fp32=pack_fp32)
        gate_act = act if self.fused_act else "none"
        self.gate = [product(layer.mlp.gate_proj, activation=gate_act) for layer in layers]
        self.up = [product(layer.mlp.up_proj) for layer in layers]
        self.down = [product(layer.mlp.down_proj) for layer in layers]
        self.lm_head = product(model.lm_head)
        self._lm_head_module = model.lm_head

    def packed_modules(self) -> list[tuple[torch.nn.Module, Linear]]:
        """The model's modules whose products this step packed, each with the packed
        callable computing the same (:func:`~worker.engine.fastpath.routing.route`);
        none when nothing is packed (fp32 without ``pack_fp32``)."""
        if not self.packed:
            return []
        pairs: list[tuple[torch.nn.Module, Linear]] = [(self._lm_head_module, self.lm_head)]
        for i, layer in enumerate(self.body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            pairs += [
                (attn.q_proj, self.q[i]),
                (attn.k_proj, self.k[i]),
                (attn.v_proj, self.v[i]),
                (attn.o_proj, self.o[i]),
            ]
            if self.fused_act:  # the activation is inside the gate: the whole MLP at once
                pairs.append((mlp, _gated(self.gate[i], self.up[i], self.down[i])))
            else:
                pairs += [(mlp.gate_proj, self.gate[i]), (mlp.up_proj, self.up[i])]
                pairs.append((mlp.down_proj, self.down[i]))
        return pairs

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``[rows, vocab]`` float32 logits of the next token of every row."""
        rows, dim = ids.shape[0], self.head_dim
        keep = step_mask(self.batch, mask)
        h = self.body.embed_tokens(ids)  # a fresh tensor: the residual adds go in place
        cos, sin = self.body.rotary_emb(h, positions)
        for i, layer in enumerate(self.body.layers):
            x = layer.input_layernorm(h)
            q = self.q[i](x).view(rows, 1, self.heads, dim).transpose(1, 2)
            k = self.k[i](x).view(rows, 1, self.kv_heads, dim).transpose(1, 2)
            v = self.v[i](x).view(rows, 1, self.kv_heads, dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            h.add_(self.o[i](attend(self.batch, i, q, k, v, keep, self.scale, self.products)))
            x = layer.post_attention_layernorm(h)
            gate = self.gate[i](x)
            if not self.fused_act:
                gate = layer.mlp.act_fn(gate)
            h.add_(self.down[i](gate * self.up[i](x)))
            if self.between_layers is not None and i + 1 < len(self.body.layers):
                self.between_layers()
        logits: torch.Tensor = self.lm_head(self.body.norm(h)[:, -1])
        return logits.float()


def _gated(gate: Linear, up: Linear, down: Linear) -> Linear:
    return lambda x: down(gate(x) * up(x))


def build(model: Any, batch: SlotCache, max_rows: int, *, pack_fp32: bool = False) -> LlamaStep:
    """The step for ``model`` (see :func:`supports`); ``pack_fp32`` as in the step."""
    return LlamaStep(model, batch, max_rows, pack_fp32=pack_fp32)
