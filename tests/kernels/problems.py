"""Seeded random CATS MLP problems with thresholds that give exact, stable active counts."""

import math
from dataclasses import dataclass

import torch

from cats_serve.kernels.int8 import Int8Matrix, quantize_int8


@dataclass
class Problem:
    x: torch.Tensor  # [B, H]
    w_gate: torch.Tensor  # [I, H]
    w_up: torch.Tensor  # [I, H]
    w_down_t: torch.Tensor  # [I, H]
    threshold: torch.Tensor  # [B] float32


def row_targets(sparsity: float, rows: int) -> list[float]:
    """Per-row target sparsities: the given one at 0 and 1, else spread around it."""
    if sparsity in (0.0, 1.0):
        return [sparsity] * rows
    spread = (0.0, -0.2, 0.2)
    return [min(0.95, max(0.05, sparsity + spread[b % 3])) for b in range(rows)]


def gap_threshold(values: torch.Tensor, target: float) -> float:
    """A threshold inside the widest gap of sorted |g| values near the target quantile.

    Placing it far from every value means kernels and references, which round differently,
    agree exactly on which neurons are active, so counts can be compared exactly.
    """
    v = values.sort().values
    n = v.numel()
    k = int(target * n)
    lo, hi = max(1, k - n // 6), min(n - 1, k + n // 6)
    gaps = v[lo : hi + 1] - v[lo - 1 : hi]
    j = int(gaps.argmax())
    left, right = v[lo - 1 + j].item(), v[lo + j].item()
    # Each side of the threshold is >= 0.4% of it away: more than bf16 rounding of the gate
    # GEMM output (2^-9 relative) moves an activation.
    assert right - left > 0.008 * right, "no usable gap: use another seed or size"
    return 0.5 * (left + right)


def row_thresholds(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """float32 [B]: per row of ``scores`` [B, I], 0.0 for target 0, above every score for
    target 1, else a gap threshold near the row's target quantile (see row_targets)."""
    thresholds = []
    for b, target in enumerate(row_targets(sparsity, scores.shape[0])):
        if target == 0.0:
            thresholds.append(0.0)
        elif target == 1.0:
            thresholds.append(2.0 * scores[b].max().item() + 1.0)
        else:
            thresholds.append(gap_threshold(scores[b], target))
    return torch.tensor(thresholds, dtype=torch.float32)


def make_problem(
    batch: int, hidden: int, inter: int, dtype: torch.dtype, device: str, sparsity: float, seed=0
) -> Problem:
    """Random weights with unit-scale gate outputs; per-row thresholds reaching ~sparsity.

    sparsity 0.0 gives threshold 0 (every nonzero activation is active); 1.0 gives a
    threshold above every |g| (no neuron active).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=gen).to(dtype)
    w_gate = (torch.randn(inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w_up = (torch.randn(inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w_down_t = (torch.randn(inter, hidden, generator=gen) / inter**0.5).to(dtype)
    g = torch.nn.functional.silu(x.double() @ w_gate.double().t()).abs()
    threshold = row_thresholds(g, sparsity)
    tensors = [t.to(device) for t in (x, w_gate, w_up, w_down_t, threshold)]
    return Problem(*tensors)


@dataclass
class Int8Weights:
    w_gate: Int8Matrix
    w_up: Int8Matrix
    w_down_t: Int8Matrix  # W_down, logical [H, I]


def make_int8_problem(
    batch: int, hidden: int, inter: int, dtype: torch.dtype, device: str, sparsity: float,
    seed=0, *, down_transposed: bool = True,
) -> tuple[Problem, Int8Weights]:  # fmt: skip
    """``make_problem`` with its weights quantized to int8: the Problem holds the dequantized
    weights in float32 (what the references and the thresholds are computed from, so the
    thresholds sit in gaps of the int8 model's activations), and Int8Weights the int8 ones."""
    p = make_problem(batch, hidden, inter, torch.float32, "cpu", 0.0, seed)
    q = Int8Weights(
        quantize_int8(p.w_gate),
        quantize_int8(p.w_up),
        quantize_int8(p.w_down_t.t(), transposed=down_transposed),
    )
    p.w_gate, p.w_up = q.w_gate.weight(torch.float32), q.w_up.weight(torch.float32)
    p.w_down_t = q.w_down_t.weight(torch.float32).t().contiguous()
    g = torch.nn.functional.silu(p.x.double() @ p.w_gate.double().t()).abs()
    p.threshold = row_thresholds(g, sparsity)
    p.x = p.x.to(dtype)
    for name in ("x", "w_gate", "w_up", "w_down_t", "threshold"):
        setattr(p, name, getattr(p, name).to(device))
    moved = [Int8Matrix(m.q.to(device), m.scale.to(device), m.transposed) for m in vars(q).values()]
    return p, Int8Weights(*moved)


def poison_allocator(device: str, numel: int) -> None:
    """Fill, then free, a NaN block so that uninitialised buffers the next call allocates
    (from the caching allocator on CUDA, often from malloc's free list on CPU) hold NaN."""
    block = torch.full((numel,), float("nan"), device=device)
    del block


def make_scaled_problem(
    batch: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    device: str,
    sparsity: float,
    seed=0,
    scale_range=(0.2, 5.0),
) -> tuple[Problem, torch.Tensor]:
    """``make_problem``'s tensors plus a seeded per-neuron scale s (float32 [I], log-uniform
    over scale_range), with per-row thresholds placed for the scaled scores |g| * s.

    The thresholds follow make_problem's rule (0.0 / gap near the target quantile / above
    every score), applied to |g| * s instead of |g|, so that kernels and references agree
    exactly on the mask under s.
    """
    p = make_problem(batch, hidden, inter, dtype, "cpu", 0.0, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    lo, hi = (math.log(v) for v in scale_range)
    scale = (lo + (hi - lo) * torch.rand(inter, generator=gen, dtype=torch.float64)).exp().float()
    g = torch.nn.functional.silu(p.x.double() @ p.w_gate.double().t()).abs()
    p.threshold = row_thresholds(g * scale.double(), sparsity)
    for name in ("x", "w_gate", "w_up", "w_down_t", "threshold"):
        setattr(p, name, getattr(p, name).to(device))
    return p, scale.to(device)


def down_thresholds(p: Problem, targets: list[float]) -> torch.Tensor:
    """float32 [B] second thresholds for ``p`` (two-threshold mode): per row, 0.0 for target
    0, above every |a| for target 1, else a gap threshold on |a| = |CATS(SiLU(g)) * u| of the
    row's active neurons, dropping about that fraction of them."""
    x, wg, wu = (t.double().cpu() for t in (p.x, p.w_gate, p.w_up))
    g = torch.nn.functional.silu(x @ wg.t())
    a = (g * (x @ wu.t())).abs()
    active = g.abs() > p.threshold.double().cpu()[:, None]
    out = []
    for b, target in enumerate(targets):
        values = a[b][active[b]]
        if target == 0.0 or values.numel() < 8:
            out.append(0.0)
        elif target == 1.0:
            out.append(2.0 * a[b].max().item() + 1.0)
        else:
            out.append(gap_threshold(values, target))
    return torch.tensor(out, dtype=torch.float32, device=p.x.device)
