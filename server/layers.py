"""The decoder's building blocks as plain functions of tensors (so one compiled copy serves
every layer: torch.compile guards on shapes, not on which layer's weights are passed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention). x: [..., n, D]; cos/sin: [..., 1, D/2] fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def decode_attention_block(
    x: torch.Tensor,
    mlp_out: torch.Tensor,
    attn_norm: torch.Tensor,
    wqkv: torch.Tensor,
    bqkv: torch.Tensor | None,
    wo: torch.Tensor,
    mlp_norm: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of one decode layer between two MLPs.

    x, mlp_out: [B, H] (the residual stream and the previous layer's MLP output, added here);
    k_cache, v_cache: [max_batch, nkv, S, D], written at (slot b, positions[b]) for b < B;
    positions: [B]; cos, sin: [B, D/2] fp32; mask: [B, 1, 1, kv_len] bool (True = attend).
    Returns the new residual stream [B, H] and the normed MLP input [B, H].
    """
    b = x.shape[0]
    x = x + mlp_out
    qkv = F.linear(rms_norm(x, attn_norm, eps), wqkv, bqkv)
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = apply_rope(q.view(b, num_heads, head_dim), cos, sin)
    k = apply_rope(k.view(b, num_kv_heads, head_dim), cos, sin)
    slots = torch.arange(b, device=x.device)
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v.view(b, num_kv_heads, head_dim)
    kv_len = mask.shape[-1]
    keys = k_cache[:b, :, :kv_len]  # [B, nkv, S, D]
    values = v_cache[:b, :, :kv_len]
    # Grouped-query attention without copying K/V: each KV head serves `group` query heads.
    group = num_heads // num_kv_heads
    qg = q.view(b, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * head_dim**-0.5
    scores = scores.masked_fill(~mask, -torch.inf)  # [B, nkv, group, S]
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    attn = torch.matmul(probs, values).reshape(b, num_heads * head_dim)
    x = x + F.linear(attn, wo)
    return x, rms_norm(x, mlp_norm, eps)
