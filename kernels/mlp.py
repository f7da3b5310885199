"""Entry points of the CATS MLP: decode (sparse or dense) and prefill (dense).

Layouts: x [B, H]; w_gate, w_up [I, H]; w_down_t [I, H] (W_down transposed once at load);
or int8 weights (`Int8Matrix`, int8.py) in their place, read by the same paths;
threshold [B] float32 on x's device; neuron_scale None or float32 [I] on x's device (the
criterion's per-neuron weights s: a neuron is active when |SiLU(gate)| * s_i > t);
down_threshold None or float32 [B] (two-threshold mode: an active neuron also needs
|a_i| > t_down, a = CATS_t(SiLU(gate(x))) * up(x), to read its W_down row and contribute).
out = down(a masked) in x.dtype. Every path (sparse, dense, prefill) applies the same masks.
No function here synchronises with the device: counts are added into ``active_count`` on the
device, and the path is chosen from host-side values only.
"""

import torch

from .activation import launch_cats_activation
from .dispatch import choose_mlp_path
from .gate import compact_buffers, gate_config, launch_gate
from .gather import cats_mlp_gather
from .int8 import Int8Matrix, Weight, down_projection, linear
from .reference import active_counts_reference, cats_mlp_torch
from .runtime import triton_available_for
from .updown import launch_updown, updown_config, updown_workspace
from .validate import (
    check_counter,
    check_index_range,
    check_input,
    check_mlp_weights,
    check_neuron_scale,
    check_threshold,
)

PATHS = ("auto", "sparse", "dense")


def _check_mlp_args(
    x, w_gate, w_up, w_down_t, threshold, active_count, count_len, scale, down_t, down_count
):
    check_input("x", x)
    rows, hidden = x.shape
    if isinstance(w_gate, Int8Matrix | torch.Tensor) and len(w_gate.shape) == 2:
        intermediate = w_gate.shape[0]
    else:
        raise ValueError("w_gate must be a 2-D tensor [intermediate, hidden] or an Int8Matrix")
    check_mlp_weights(w_gate, w_up, w_down_t, intermediate, hidden, x)
    check_threshold("threshold", threshold, rows, x.device)
    check_neuron_scale("neuron_scale", scale, intermediate, x.device)
    check_counter("active_count", active_count, count_len(rows), x.device)
    check_threshold("down_threshold", down_t, rows, x.device, optional=True)
    check_counter("down_count", down_count, count_len(rows), x.device)
    if down_count is not None and (down_t is None or active_count is None):
        raise ValueError("down_count needs down_threshold and active_count")
    check_index_range(hidden, intermediate, rows)


def _sparse_decode(
    x, w_gate, w_up, w_down_t, threshold, active_count, scale=None, configs=None,
    down_t=None, down_count=None,
):  # fmt: skip
    """Two launches: the gate kernel (W_gate in full; g_masked, counts, the packed list of
    union-active neurons; zeroes the next kernel's workspace), then the fused up + down kernel
    over that list. configs: optional (gate config, updown config), for benchmarks."""
    B, H = x.shape
    if isinstance(w_down_t, Int8Matrix) and not w_down_t.transposed:
        raise ValueError("the sparse kernels read an int8 W_down stored transposed ([I, H])")
    g_cfg, u_cfg = configs or (gate_config(B), updown_config(B, x.dtype))
    acc, ticket = updown_workspace(B, H, x.device)
    compact = compact_buffers(w_up.shape[0], x.device, g_cfg)
    g_masked, _ = launch_gate(
        x, w_gate, None, threshold, active_count, acc, ticket, g_cfg, compact, scale
    )
    return launch_updown(
        x, w_up, w_down_t, g_masked, *compact, acc, ticket, u_cfg, down_t, down_count
    )


def _dense_decode(
    x, w_gate, w_up, w_down_t, threshold, active_count, union, scale, down_t, down_count
):  # fmt: skip
    if triton_available_for(x.device):
        act = launch_cats_activation(
            linear(x, w_gate), linear(x, w_up), threshold, active_count, union, scale,
            down_t, down_count,
        )  # fmt: skip
        return down_projection(act, w_down_t)
    out, active, down = cats_mlp_torch(x, w_gate, w_up, w_down_t, threshold, scale, down_t)
    for counter, flags in ((active_count, active), (down_count, down)):
        if counter is not None:
            counts = active_counts_reference(flags)
            counter.add_(counts if union else counts[:-1].sum(dtype=torch.int32).reshape(1))
    return out


def cats_mlp_decode(
    x: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    w_down_t: Weight,
    threshold: torch.Tensor,
    *,
    active_count: torch.Tensor | None = None,
    path: str = "auto",
    union_sparsity_hint: float | None = None,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
    down_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of a CATS MLP: out [B, H] in x.dtype.

    x [B, H] (B >= 1, contiguous, fp32/fp16/bf16); w_gate, w_up, w_down_t [I, H] of x's dtype
    and device, contiguous, or int8 weights (`Int8Matrix`: W_gate and W_up untransposed, W_down
    in either layout, transposed for the sparse Triton path); threshold [B] float32 on x's
    device (0.0 = dense-equivalent row).
    active_count: optional int32 [B + 1] on x's device; the active neurons of each row are
    added into entries 0..B-1 and those of the batch union into entry B.
    down_threshold: optional float32 [B], the two-threshold mode's second threshold (0 for a
    single-threshold row); down_count: optional int32 [B + 1] like active_count, for the
    down-active neurons (the W_down rows the sparse path reads); needs active_count.
    path: "sparse" (Triton kernels reading only union-active W_up / W_down rows), "dense"
    (cuBLAS GEMMs, threshold still applied, counts still added) or "auto" (``choose_mlp_path``
    decides from the batch size and ``union_sparsity_hint``, the previous step's union
    sparsity; without a hint it picks dense). Where Triton cannot run (CPU without
    TRITON_INTERPRET=1) both paths use PyTorch ops: "sparse" gathers the union-active rows
    (``cats_mlp_gather``), "dense" is ``cats_mlp_torch``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    _check_mlp_args(
        x, w_gate, w_up, w_down_t, threshold, active_count, lambda b: b + 1, neuron_scale,
        down_threshold, down_count,
    )  # fmt: skip
    if path == "auto":
        B, H = x.shape
        path = choose_mlp_path(
            B, H, w_gate.shape[0], x.dtype, x.device, union_sparsity_hint,
            int8=isinstance(w_gate, Int8Matrix),
        )  # fmt: skip
    args = (x, w_gate, w_up, w_down_t, threshold, active_count)
    if path == "sparse":
        if triton_available_for(x.device):
            return _sparse_decode(*args, neuron_scale, down_t=down_threshold, down_count=down_count)
        return cats_mlp_gather(*args, neuron_scale, down_threshold, down_count)
    return _dense_decode(*args, True, neuron_scale, down_threshold, down_count)


def cats_mlp_prefill(
    x: torch.Tensor,
    w_gate: Weight,
    w_up: Weight,
    w_down_t: Weight,
    threshold: torch.Tensor,
    *,
    active_count: torch.Tensor | None = None,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
    down_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill MLP: dense GEMMs with the CATS threshold(s) applied; out [N, H] in x.dtype.

    x [N, H], the tokens of one or several sequences; threshold [N] float32, one per token;
    down_threshold: optional float32 [N] (two-threshold mode).
    active_count, down_count: optional int32 [1]; the number of active (down-active)
    (token, neuron) pairs over all N tokens is added into it (per-token and union counts are
    not kept for prefill).
    """
    _check_mlp_args(
        x, w_gate, w_up, w_down_t, threshold, active_count, lambda n: 1, neuron_scale,
        down_threshold, down_count,
    )  # fmt: skip
    return _dense_decode(
        x, w_gate, w_up, w_down_t, threshold, active_count, False, neuron_scale,
        down_threshold, down_count,
    )  # fmt: skip
