"""Sparse CATS decode MLP with PyTorch ops, for CPUs (where the Triton kernels do not run).

The gate runs dense; then only the rows of W_up that belong to the batch's union of active
neurons are gathered (`index_select` reads just those rows, each contiguous) and multiplied,
and of W_down^T only the rows of the union of down-active neurons (all active ones without a
down threshold). On a memory-bound CPU decode step this skips the other rows' bytes, as the
GPU kernels do. Int8 weights (`Int8Matrix`) are gathered the same way, their scales with
them. Same results and counts as ``cats_mlp_torch`` (SiLU, the product and the masks
in float32, the products with the weights in the inputs' dtype).
"""

import threading

import torch
import torch.nn.functional as F

from .int8 import Int8Matrix, Weight, linear
from .reference import active_counts_reference, cats_mask, down_mask

# Reused destinations of the gathers, per thread and per (rows, cols, dtype): a fresh
# multi-megabyte tensor per call would be page-faulted in every time, which costs more than the
# copy itself.
_scratch = threading.local()


def _gathered(w: torch.Tensor, which: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of `w` copied into this thread's buffer `which` (0: W_up, 1: W_down^T)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (which, *w.shape, w.dtype, w.device)
    if key not in buffers:
        # Normal tensors, so that callers inside and outside inference mode may both write them.
        with torch.inference_mode(False):
            buffers[key] = torch.empty_like(w)
    return torch.index_select(w, 0, rows, out=buffers[key][: rows.shape[0]])


def _up_rows(w_up: Weight, rows: torch.Tensor) -> Weight:
    if isinstance(w_up, Int8Matrix):
        return w_up.select_rows(rows)
    return _gathered(w_up, 0, rows)


def _down_product(act: torch.Tensor, w_down_t: Weight, rows: torch.Tensor) -> torch.Tensor:
    """act [B, K] times the down weights of neurons `rows` [K] -> [B, H] in act's dtype."""
    if isinstance(w_down_t, Int8Matrix):
        return linear(act, w_down_t.select_inputs(rows))
    return act @ _gathered(w_down_t, 1, rows)


def cats_mlp_gather(
    x: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    w_down_t: Weight,
    threshold: torch.Tensor,
    active_count: torch.Tensor | None = None,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
    down_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [B, H] in x.dtype; active_count and down_count (int32 [B + 1]) get per-row and
    union counts of active and of down-active neurons."""
    g = F.silu(linear(x, w_gate).float())  # [B, I]
    active = cats_mask(g, threshold, neuron_scale)
    union = active.any(dim=0).nonzero().squeeze(1)  # [K] union-active neuron ids
    g_union = torch.where(active, g, torch.zeros_like(g)).index_select(1, union)  # [B, K]
    act = g_union * linear(x, _up_rows(w_up, union)).float()  # [B, K] float32
    if active_count is not None:
        active_count.add_(active_counts_reference(active))
    if down_threshold is None:
        return _down_product(act.to(x.dtype), w_down_t, union)
    down = down_mask(act, active.index_select(1, union), down_threshold)  # [B, K]
    keep = down.any(dim=0).nonzero().squeeze(1)  # positions in `union` whose down row is read
    if down_count is not None:
        per_row = down.sum(dim=1, dtype=torch.int32)
        down_count.add_(torch.cat([per_row, keep.new_tensor([keep.numel()]).int()]))
    act = torch.where(down, act, torch.zeros_like(act)).index_select(1, keep)
    return _down_product(act.to(x.dtype), w_down_t, union.index_select(0, keep))
