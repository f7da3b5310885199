"""PyTorch references of the CATS MLP kernels: the test oracle and the CPU fallback.

Shapes and layouts used throughout:
    x          [B, H]  activations, one row per sequence (decode) or token (prefill)
    w_gate     [I, H]  row-major, one row per neuron
    w_up       [I, H]  row-major, one row per neuron
    w_down_t   [I, H]  W_down stored transposed once at load, so neuron i's output weights are
                       the contiguous row i
    threshold  [B]     float32, one CATS threshold per row (0.0 keeps every nonzero activation)
    neuron_scale [I]   float32 > 0 or None (= all ones): a per-neuron weight of the criterion
    down_threshold [B] float32 or None (= 0): the second threshold, on |a_i| (two-threshold mode)

CATS_t(z) = SiLU(z) where |SiLU(z)| * s_i > t, else 0 (s_i = neuron_scale[i], 1 in the CATS
paper). A neuron is "active" for row b when |SiLU(gate(x_b))_i| * s_i > t_b; the batch union
is the set of neurons active for at least one row. Active neurons read their W_up row.
Two-threshold mode: of the active neurons, those whose a_i = CATS_t(SiLU(gate_i)) * up_i has
|a_i| > down_threshold_b also read their W_down row ("down-active"); the others contribute
nothing. A down threshold of 0 gives single-threshold CATS (a neuron with a_i = 0 adds nothing,
so skipping its row changes no result).
Any weight may be int8 (`Int8Matrix`, int8.py): the references dequantize it, the torch path
multiplies through `int8.linear`. The ``*_reference`` functions compute in float32
(``compute_dtype``) from the given inputs;
``cats_activation_torch`` and ``cats_mlp_torch`` compute in the inputs' dtype, like the
dense GPU path does, and serve as the fallback when no Triton backend is usable.
"""

import torch
import torch.nn.functional as F

from .int8 import Weight, dequantized, down_projection, linear


def cats_mask(
    g: torch.Tensor, threshold: torch.Tensor, neuron_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Active flags [R, I] (bool) of activations ``g`` [R, I] (float32) under per-row
    ``threshold`` [R] and optional per-neuron ``neuron_scale`` [I] (float32)."""
    score = g.abs() if neuron_scale is None else g.abs() * neuron_scale.to(g.dtype)
    return score > threshold.to(g.dtype)[:, None]


def down_mask(
    act: torch.Tensor, active: torch.Tensor, down_threshold: torch.Tensor | None
) -> torch.Tensor:
    """Down-active flags [R, I] (bool): ``active`` [R, I] neurons whose activation ``act``
    (float32, [R, I]) has |act| > ``down_threshold`` [R]; ``active`` itself without one."""
    if down_threshold is None:
        return active
    return active & (act.abs() > down_threshold.to(act.dtype)[:, None])


def active_counts_reference(active: torch.Tensor) -> torch.Tensor:
    """int32 [R + 1]: active neurons of each row of ``active`` [R, I], then of their union."""
    per_row = active.sum(dim=1, dtype=torch.int32)
    union = active.any(dim=0).sum(dtype=torch.int32).reshape(1)
    return torch.cat([per_row, union])


def gate_reference(
    x: torch.Tensor,
    w_gate: Weight,
    threshold: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
    neuron_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked gate activations [B, I] (compute_dtype) and active flags [B, I] (bool)."""
    g = F.silu(x.to(compute_dtype) @ dequantized(w_gate, compute_dtype).t())
    active = cats_mask(g, threshold, neuron_scale)
    return torch.where(active, g, torch.zeros_like(g)), active


def gate_up_reference(
    x: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    threshold: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CATS_t(SiLU(gate(x))) * up(x) as [B, I] (compute_dtype), zero where not down-active;
    active flags [B, I] and down-active flags [B, I]."""
    g_masked, active = gate_reference(x, w_gate, threshold, compute_dtype, neuron_scale)
    act = g_masked * (x.to(compute_dtype) @ dequantized(w_up, compute_dtype).t())
    down = down_mask(act.float(), active, down_threshold)
    return torch.where(down, act, torch.zeros_like(act)), active, down


def down_reference(
    act: torch.Tensor,
    w_down_t: Weight,
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out [B, H] = act [B, I] @ w_down_t [I, H], computed in compute_dtype, cast to out_dtype."""
    return (act.to(compute_dtype) @ dequantized(w_down_t, compute_dtype, down=True)).to(out_dtype)


def cats_mlp_reference(
    x: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    w_down_t: Weight,
    threshold: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CATS MLP out [B, H] in x.dtype, and the int32 counts [B + 1] (per row, then union) of
    active neurons (W_up rows read) and of down-active neurons (W_down rows read)."""
    act, active, down = gate_up_reference(
        x, w_gate, w_up, threshold, compute_dtype, neuron_scale, down_threshold
    )
    out = down_reference(act, w_down_t, x.dtype, compute_dtype)
    return out, active_counts_reference(active), active_counts_reference(down)


def cats_activation_torch(
    gate_lin: torch.Tensor,
    up_lin: torch.Tensor,
    threshold: torch.Tensor,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CATS_t(SiLU(gate_lin)) * up_lin [R, I] in the inputs' dtype (zero where not
    down-active), active flags [R, I] and down-active flags [R, I].

    SiLU, the product and the comparisons run in float32 so the masks agree with the Triton
    kernels, which compute them in float32 from the same (already rounded) GEMM outputs.
    """
    g = F.silu(gate_lin.float())
    active = cats_mask(g, threshold, neuron_scale)
    act = g * up_lin.float()
    down = down_mask(act, active, down_threshold)
    return torch.where(down, act, torch.zeros_like(g)).to(gate_lin.dtype), active, down


def cats_mlp_torch(
    x: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    w_down_t: Weight,
    threshold: torch.Tensor,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense CATS MLP in x.dtype with torch ops only: out [B, H], active and down-active
    flags [B, I]."""
    act, active, down = cats_activation_torch(
        linear(x, w_gate), linear(x, w_up), threshold, neuron_scale, down_threshold
    )
    return down_projection(act, w_down_t), active, down


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention). x: [..., n, D]; cos/sin: [..., 1, D/2] fp32;
    computed in float32, returned in x.dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    kv_len: int,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode attention over a static KV cache: out [B, nh * D] in q.dtype.

    q [B, nh, D] (RoPE applied); k_cache, v_cache [slots, nkv, S, D], row b reading slot b;
    positions [B]: row b attends to cache positions 0..positions[b] (its new token's K/V already
    written there). nh is a multiple of nkv (grouped-query attention, no K/V copy); kv_len <= S
    bounds how much of the cache is read, and every position must be < kv_len. Scores and
    softmax are float32; the two products run in compute_dtype (the input dtype for the CPU
    path, float32 for the test oracle).
    """
    b, nh, d = q.shape
    nkv = k_cache.shape[1]
    keys = k_cache[:b, :, :kv_len].to(compute_dtype)  # [B, nkv, S, D]
    values = v_cache[:b, :, :kv_len].to(compute_dtype)
    qg = q.to(compute_dtype).view(b, nkv, nh // nkv, d)  # each KV head serves a group of heads
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * d**-0.5  # [B, nkv, group, S]
    visible = torch.arange(kv_len, device=q.device) <= positions[:, None]  # [B, S]
    scores = scores.masked_fill(~visible[:, None, None, :], -torch.inf)
    probs = torch.softmax(scores, dim=-1).to(compute_dtype)
    return torch.matmul(probs, values).reshape(b, nh * d).to(q.dtype)
