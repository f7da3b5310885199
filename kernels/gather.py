"""Sparse CATS decode MLP with PyTorch ops, for CPUs (where the Triton kernels do not run).

The gate runs dense; then only the rows of W_up and W_down^T that belong to the batch's union
of active neurons are gathered (`index_select` reads just those rows, each contiguous) and
multiplied. On a memory-bound CPU decode step this skips the inactive rows' bytes, as the GPU
kernels do. Same results and counts as ``cats_mlp_torch`` (SiLU and the mask in float32, the
products in the inputs' dtype).
"""

import threading

import torch
import torch.nn.functional as F

from .reference import active_counts_reference, cats_mask

# Reused destinations of the gathers, per thread and per (rows, cols, dtype): a fresh
# multi-megabyte tensor per call would be page-faulted in every time, which costs more than the
# copy itself.
_scratch = threading.local()


def _gathered_rows(w_up: torch.Tensor, w_down_t: torch.Tensor, rows: torch.Tensor):
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (*w_up.shape, w_up.dtype, w_up.device)
    if key not in buffers:
        # Normal tensors, so that callers inside and outside inference mode may both write them.
        with torch.inference_mode(False):
            buffers[key] = (torch.empty_like(w_up), torch.empty_like(w_down_t))
    up_buf, down_buf = buffers[key]
    k = rows.shape[0]
    up = torch.index_select(w_up, 0, rows, out=up_buf[:k])
    down = torch.index_select(w_down_t, 0, rows, out=down_buf[:k])
    return up, down


def cats_mlp_gather(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: torch.Tensor,
    active_count: torch.Tensor | None = None,
    neuron_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [B, H] in x.dtype; active_count (int32 [B + 1]) gets per-row and union counts."""
    g = F.silu(F.linear(x, w_gate).float())  # [B, I]
    active = cats_mask(g, threshold, neuron_scale)
    union = active.any(dim=0).nonzero().squeeze(1)  # [K] union-active neuron ids
    g_union = torch.where(active, g, torch.zeros_like(g)).index_select(1, union)  # [B, K]
    up_rows, down_rows = _gathered_rows(w_up, w_down_t, union)
    act = (g_union * F.linear(x, up_rows).float()).to(x.dtype)  # [B, K]
    if active_count is not None:
        active_count.add_(active_counts_reference(active))
    return act @ down_rows
