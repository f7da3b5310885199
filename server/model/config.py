"""The shape of a Llama-family model, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {hf.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf.hidden_act!r} is not supported (CATS needs silu)")
        if getattr(hf, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only when attention_bias is set.
            attention_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            max_position_embeddings=hf.max_position_embeddings,
        )


def rope_inv_freq(hf, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies `[head_dim // 2]` (fp32) and the attention scaling factor.

    Scaled variants (linear, llama3, yarn, longrope) come from transformers' own initialisers so
    that our decoder rotates exactly as the reference does; `dynamic` rescales with the sequence
    length at run time, which a static cache cannot follow, so it is refused.
    """
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        theta = params.get("rope_theta") or getattr(hf, "rope_theta", 10000.0)
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (theta**exponent), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' is not supported with a static KV cache")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(scaling)
