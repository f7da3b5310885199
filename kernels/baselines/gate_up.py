"""The fused gate + up launch of the two-kernel CATS MLP (then ``baselines.down``): kept as a
benchmark baseline against the fused up + down path the server runs (see benchmarks/)."""

import torch

from ..gate import check_gate_args, launch_gate
from ..validate import check_matrix


def cats_gate_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    threshold: torch.Tensor,
    *,
    active_count: torch.Tensor | None = None,
    neuron_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gate + up: CATS_t(SiLU(x @ w_gate^T)) * (x @ w_up^T), reading only active W_up rows.

    x [B, H]; w_gate, w_up [I, H]; threshold [B] float32. Returns act [B, I] float32 and the
    union flags [I] int8. active_count and neuron_scale as in ``cats_gate``.
    """
    check_gate_args(x, w_gate, threshold, active_count, neuron_scale)
    check_matrix("w_up", w_up, w_gate.shape[0], x.shape[1], x)
    return launch_gate(x, w_gate, w_up, threshold, active_count, neuron_scale=neuron_scale)
