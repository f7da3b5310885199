"""The decoder's building blocks as plain functions of tensors (so one compiled copy serves
every layer: torch.compile guards on shapes, not on which layer's weights are passed)."""

from __future__ import annotations

import torch

from cats_serve.kernels.int8 import Weight, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention). x: [..., n, D]; cos/sin: [..., 1, D/2] fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def decode_qkv_block(
    x: torch.Tensor,
    mlp_out: torch.Tensor,
    attn_norm: torch.Tensor,
    wqkv: Weight,
    bqkv: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode layer up to attention: residual add, norm, QKV, RoPE, cache write.

    x, mlp_out: [B, H] (the residual stream and the previous layer's MLP output, added here);
    k_cache, v_cache: [max_batch, nkv, S, D], written at (slot b, positions[b]) for b < B;
    positions: [B]; cos, sin: [B, D/2] fp32.
    Returns the new residual stream [B, H] and the rotated queries [B, nh, D].
    """
    b = x.shape[0]
    x = x + mlp_out
    qkv = linear(rms_norm(x, attn_norm, eps), wqkv, bqkv)
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = apply_rope(q.view(b, num_heads, head_dim), cos, sin)
    k = apply_rope(k.view(b, num_kv_heads, head_dim), cos, sin)
    slots = torch.arange(b, device=x.device)
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v.view(b, num_kv_heads, head_dim)
    return x, q.contiguous()


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
