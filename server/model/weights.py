"""The decoder's weights as plain tensors, taken from a Hugging Face state dict.

q/k/v are fused into one matrix; `W_down` is stored transposed once (`[intermediate, hidden]`,
each neuron a contiguous row, the layout the sparse kernels read) and the original dropped.
With int8 weights (`quantize="int8"`) every linear layer's matrix is an `Int8Matrix` made from
the full-precision weight: q/k/v/o, gate, up, down and the LM head (unless `int8_lm_head` is
False); the embedding table, norms and biases stay in the model's dtype. W_down is stored
transposed where the Triton kernels read it (CUDA, or the interpreter) and as [hidden,
intermediate] elsewhere, where torch's packed int8 kernel needs each output channel a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cats_serve.kernels.int8 import Int8Matrix, Weight, quantize_int8
from cats_serve.kernels.runtime import triton_available_for
from cats_serve.server.model.config import ModelConfig

QUANTIZE = ("none", "int8")


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: Weight  # [(nh + 2 nkv) * D, H]
    bqkv: torch.Tensor | None  # [(nh + 2 nkv) * D]
    wo: Weight  # [H, nh * D]
    mlp_norm: torch.Tensor  # [H]
    w_gate: Weight  # [I, H]
    w_up: Weight  # [I, H]
    w_down_t: Weight  # [I, H]  (W_down transposed); int8: W_down, logical [H, I]
    neuron_scale: torch.Tensor | None = None  # [I] fp32: weights of the CATS criterion


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: Weight  # [V, H]; the embedding itself when tied (full precision)

    @classmethod
    def from_state(
        cls,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        quantize: str = "none",
        int8_lm_head: bool = True,
        quantized: dict[str, Int8Matrix] | None = None,
    ) -> ModelWeights:
        """Take every tensor the decoder needs out of `state` (popped, so a large checkpoint
        is not held twice); ValueError names a missing tensor. quantize: "none" or "int8".
        quantized: int8 matrices already made (server/model/int8_cache.py), by checkpoint
        name ("...qkv_proj.weight" for the fused q/k/v); used where their shape fits, and
        every matrix made here is added to it."""
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        int8 = quantize == "int8"
        down_transposed = triton_available_for(device)
        made = quantized if quantized is not None else {}

        def int8_matrix(name: str, w: torch.Tensor, transposed: bool = False) -> Int8Matrix:
            """The int8 form of `w` ([N, K], popped from state): made before (read onto `device`
            by the cache), or now."""
            m = made.get(name)
            if m is None or m.shape != tuple(w.shape) or m.transposed != transposed:
                m = quantize_int8(w.to(device=device), transposed=transposed)
                made[name] = m
            return m

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint has no tensor {name!r}")
            return state.pop(name).to(device=device, dtype=dtype)

        def matrix(name: str, *, down: bool = False) -> Weight:
            """A linear layer's weight [N, K]: full precision (W_down transposed), or int8
            quantized from the checkpoint's own precision."""
            if not int8:
                w = take(name)
                return w.t().contiguous() if down else w
            if name not in state:
                raise ValueError(f"checkpoint has no tensor {name!r}")
            return int8_matrix(name, state.pop(name), transposed=down and down_transposed)

        def fused_qkv(p: str) -> Weight:
            names = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            if not int8:
                return torch.cat([take(n) for n in names])
            for n in names:
                if n not in state:
                    raise ValueError(f"checkpoint has no tensor {n!r}")
            fused = torch.cat([state.pop(n) for n in names])
            return int8_matrix(p + "self_attn.qkv_proj.weight", fused)

        embed = take("model.embed_tokens.weight")
        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            wqkv = fused_qkv(p)
            bias = (
                torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                if config.attention_bias
                else None
            )
            layers.append(
                LayerWeights(
                    attn_norm=take(p + "input_layernorm.weight"),
                    wqkv=wqkv,
                    bqkv=bias,
                    wo=matrix(p + "self_attn.o_proj.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    w_gate=matrix(p + "mlp.gate_proj.weight"),
                    w_up=matrix(p + "mlp.up_proj.weight"),
                    w_down_t=matrix(p + "mlp.down_proj.weight", down=True),
                )
            )
        final_norm = take("model.norm.weight")
        if config.tie_word_embeddings or "lm_head.weight" not in state:
            state.pop("lm_head.weight", None)
            int8_head = int8 and int8_lm_head
            lm_head: Weight = int8_matrix("lm_head.weight", embed) if int8_head else embed
        elif int8 and int8_lm_head:
            lm_head = matrix("lm_head.weight")
        else:
            lm_head = take("lm_head.weight")
        return cls(embed, layers, final_norm, lm_head)
