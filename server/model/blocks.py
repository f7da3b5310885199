"""The decoder's building blocks as plain functions of tensors (so one compiled copy serves
every layer: torch.compile guards on shapes, not on which layer's weights are passed)."""

from __future__ import annotations

import torch

from cats_serve.kernels.int8 import Weight, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def decode_qkv_block(
    x: torch.Tensor,
    mlp_out: torch.Tensor,
    attn_norm: torch.Tensor,
    wqkv: Weight,
    bqkv: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode layer up to attention: residual add, norm, QKV projection.

    x, mlp_out: [B, H] (the residual stream and the previous layer's MLP output, added here).
    Returns the new residual stream [B, H] and the projection [B, (nh + 2 nkv) * D], not
    rotated: `decode_attention_rope` applies RoPE and writes the cache."""
    x = x + mlp_out
    return x, linear(rms_norm(x, attn_norm, eps), wqkv, bqkv)


def decode_output_block(
    x: torch.Tensor, attn_out: torch.Tensor, mlp_norm: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode layer after the attention's output projection: x [B, H] plus attn_out [B, H]
    -> the new residual stream [B, H] and the normed MLP input [B, H].

    The projection itself stays outside: compiled together, `x + attn @ W_o^T` becomes one
    `addmm`, which copies x into its output before the GEMM (a device-to-device copy per layer
    on CUDA); apart, the add fuses into the norm's kernel, as prefill computes it."""
    x = x + attn_out
    return x, rms_norm(x, mlp_norm, eps)
