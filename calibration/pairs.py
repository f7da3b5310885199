"""Per-layer thresholds as the model takes them: a [2, L] tensor of (t_up, t_down).

Calibration and evaluation pass thresholds around as one value per layer: a float (one
threshold, the CATS paper's and the version 1-2 files'), or a (t_up, t_down) pair (the
two-threshold mode). Lists may mix both (the allocated mode's sensitivity runs set one layer
and leave the others dense at 0.0). A float t is the pair (t, 0): a down threshold of 0 keeps
the W_down row of every active neuron.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LayerThreshold = float | tuple[float, float]


def threshold_tensor(thresholds, num_layers: int, device) -> torch.Tensor:
    """float32 [2, num_layers] on `device` from None (dense), a per-layer list of floats or
    pairs, or a tensor of shape [L] or [2, L]."""
    if thresholds is None:
        return torch.zeros(2, num_layers, dtype=torch.float32, device=device)
    if isinstance(thresholds, torch.Tensor):
        t = thresholds.to(device=device, dtype=torch.float32)
        if t.dim() == 1:
            t = torch.stack([t, torch.zeros_like(t)])
    else:
        t = torch.tensor([_pair(v) for v in thresholds], dtype=torch.float32).t().to(device)
    if t.shape != (2, num_layers):
        raise ValueError(
            f"thresholds must give one value or (t_up, t_down) pair for each of the "
            f"{num_layers} layers, got shape {tuple(t.shape)}"
        )
    return t.contiguous()


def _pair(value) -> tuple[float, float]:
    if isinstance(value, Sequence):
        up, down = value
        return float(up), float(down)
    return float(value), 0.0
