"""The decoder's weights as plain tensors, taken from a Hugging Face state dict.

q/k/v are fused into one matrix; `W_down` is stored transposed once (`[intermediate, hidden]`,
each neuron a contiguous row, the layout the sparse kernels read) and the original dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cats_serve.server.model.config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor  # [(nh + 2 nkv) * D, H]
    bqkv: torch.Tensor | None  # [(nh + 2 nkv) * D]
    wo: torch.Tensor  # [H, nh * D]
    mlp_norm: torch.Tensor  # [H]
    w_gate: torch.Tensor  # [I, H]
    w_up: torch.Tensor  # [I, H]
    w_down_t: torch.Tensor  # [I, H]  (W_down transposed)
    neuron_scale: torch.Tensor | None = None  # [I] fp32: weights of the CATS criterion


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the embedding itself when tied

    @classmethod
    def from_state(
        cls,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> ModelWeights:
        """Take every tensor the decoder needs out of `state` (popped, so a large checkpoint
        is not held twice); ValueError names a missing tensor."""

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint has no tensor {name!r}")
            return state.pop(name).to(device=device, dtype=dtype)

        embed = take("model.embed_tokens.weight")
        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            bias = (
                torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                if config.attention_bias
                else None
            )
            layers.append(
                LayerWeights(
                    attn_norm=take(p + "input_layernorm.weight"),
                    wqkv=torch.cat(qkv).contiguous(),
                    bqkv=bias,
                    wo=take(p + "self_attn.o_proj.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    w_gate=take(p + "mlp.gate_proj.weight"),
                    w_up=take(p + "mlp.up_proj.weight"),
                    w_down_t=take(p + "mlp.down_proj.weight").t().contiguous(),
                )
            )
        final_norm = take("model.norm.weight")
        if config.tie_word_embeddings or "lm_head.weight" not in state:
            state.pop("lm_head.weight", None)
            lm_head = embed
        else:
            lm_head = take("lm_head.weight")
        return cls(embed, layers, final_norm, lm_head)
