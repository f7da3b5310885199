"""CATS activation for the dense paths: act = CATS_t(SiLU(gate_lin)) * up_lin, plus counts.

The dense decode path and prefill compute the gate and up GEMMs with cuBLAS (F.linear); this
one elementwise kernel replaces the SiLU, threshold, multiply and counting ops, so the dense
path launches no more kernels than a plain `down(silu(gate(x)) * up(x))` chain.

Grid (I / BLOCK_I, row groups). With UNION (decode) there is one row group that loops over all
rows in chunks of BLOCK_R, so the union of each neuron over the batch is known; counts go to
count[r] per row and count[R] for the union. Without UNION (prefill) each program takes
BLOCK_R rows and adds its total to count[0].
With HAS_DOWN (two-threshold mode) a neuron is kept only where also |act| > down_thr[r] (the
act of a dropped neuron is written as 0), and the kept (down-active) neurons are counted into
down_count the same way.
"""

import torch
import triton
import triton.language as tl

from .runtime import interpreter_enabled, on_tensor_device


@triton.jit
def _cats_activation_kernel(
    gate_ptr,  # [R, I] gate GEMM output
    up_ptr,  # [R, I] up GEMM output
    thr_ptr,  # [R] float32 thresholds
    scale_ptr,  # [I] float32 per-neuron weights of the criterion (read with HAS_SCALE)
    out_ptr,  # [R, I] activations, same dtype as gate_ptr
    count_ptr,  # int32, added into: [R + 1] with UNION, else [1]
    dthr_ptr,  # [R] float32 down thresholds (read with HAS_DOWN)
    dcount_ptr,  # int32 like count_ptr, for down-active neurons (with COUNT_DOWN)
    R,
    inter,
    rows_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    UNION: tl.constexpr,
    COUNT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_DOWN: tl.constexpr,
    COUNT_DOWN: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_r = tl.program_id(1)
    rn = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    n_ok = rn < inter
    if HAS_SCALE:
        s = tl.load(scale_ptr + rn, mask=n_ok, other=1.0)
    union = tl.zeros([BLOCK_I], dtype=tl.int32)
    total = tl.zeros([BLOCK_R], dtype=tl.int32)
    down_union = tl.zeros([BLOCK_I], dtype=tl.int32)
    down_total = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r0 in range(0, rows_per_program, BLOCK_R):
        rr = pid_r * rows_per_program + r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        offs = rr[:, None] * inter + rn[None, :]
        m = r_ok[:, None] & n_ok[None, :]
        z = tl.load(gate_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = z * tl.sigmoid(z)
        t = tl.load(thr_ptr + rr, mask=r_ok, other=float("inf"))
        score = tl.abs(g) * s[None, :] if HAS_SCALE else tl.abs(g)
        active = (score > t[:, None]) & n_ok[None, :]
        act = g * u
        kept = active
        if HAS_DOWN:
            td = tl.load(dthr_ptr + rr, mask=r_ok, other=float("inf"))
            kept = active & (tl.abs(act) > td[:, None])
        tl.store(out_ptr + offs, tl.where(kept, act, 0.0).to(out_ptr.dtype.element_ty), mask=m)
        active_i = active.to(tl.int32)
        kept_i = kept.to(tl.int32)
        if COUNT:
            if UNION:
                tl.atomic_add(count_ptr + rr, tl.sum(active_i, axis=1), mask=r_ok, sem="relaxed")
                union = tl.maximum(union, tl.max(active_i, axis=0))
                if COUNT_DOWN:
                    tl.atomic_add(dcount_ptr + rr, tl.sum(kept_i, axis=1), mask=r_ok, sem="relaxed")
                    down_union = tl.maximum(down_union, tl.max(kept_i, axis=0))
            else:
                total += tl.sum(active_i, axis=1)
                down_total += tl.sum(kept_i, axis=1)
    if COUNT:
        if UNION:
            tl.atomic_add(count_ptr + R, tl.sum(union, axis=0), sem="relaxed")
            if COUNT_DOWN:
                tl.atomic_add(dcount_ptr + R, tl.sum(down_union, axis=0), sem="relaxed")
        else:
            tl.atomic_add(count_ptr, tl.sum(total, axis=0), sem="relaxed")
            if COUNT_DOWN:
                tl.atomic_add(dcount_ptr, tl.sum(down_total, axis=0), sem="relaxed")


@on_tensor_device
def launch_cats_activation(
    gate_lin: torch.Tensor,
    up_lin: torch.Tensor,
    threshold: torch.Tensor,
    active_count: torch.Tensor | None,
    union: bool,
    neuron_scale: torch.Tensor | None = None,
    down_threshold: torch.Tensor | None = None,
    down_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """act [R, I] (gate_lin's dtype) from validated, contiguous gate_lin/up_lin [R, I].

    neuron_scale: optional float32 [I], the criterion's per-neuron weights.
    union=True: active_count is int32 [R + 1] (per row, then union); else int32 [1] (total).
    down_threshold: optional float32 [R] (two-threshold mode); down_count, optional and laid
    out like active_count, gets the down-active counts.
    """
    R, inter = gate_lin.shape
    out = torch.empty_like(gate_lin)
    block_r = min(triton.next_power_of_2(R), 16)
    # Decode: one row group, so narrow neuron blocks give enough programs to fill the GPU.
    block_i = 64 if interpreter_enabled() or union else 128
    if union:
        rows_per_program, row_groups = triton.cdiv(R, block_r) * block_r, 1
    else:
        rows_per_program, row_groups = block_r, triton.cdiv(R, block_r)
    grid = (triton.cdiv(inter, block_i), row_groups)
    _cats_activation_kernel[grid](
        gate_lin,
        up_lin,
        threshold,
        neuron_scale if neuron_scale is not None else threshold,
        out,
        active_count if active_count is not None else threshold,
        down_threshold if down_threshold is not None else threshold,
        down_count if down_count is not None else threshold,
        R,
        inter,
        rows_per_program,
        BLOCK_R=block_r,
        BLOCK_I=block_i,
        UNION=union,
        COUNT=active_count is not None,
        HAS_SCALE=neuron_scale is not None,
        HAS_DOWN=down_threshold is not None,
        COUNT_DOWN=down_threshold is not None and down_count is not None,
        num_warps=4,
    )
    return out
