"""Fused CATS gate (+ up) kernel for decode.

One program owns BLOCK_I neurons and every row of the batch:
  1. z = x @ W_gate[rows]^T over the whole hidden dim (W_gate is always read in full: the mask
     comes from it), g = SiLU(z), active = |g| * s_i > t_b (s = the optional per-neuron
     weights of the criterion, 1 without HAS_SCALE), per-row and union counts added on device;
  2. with WITH_UP, it then reads only the W_up rows active in the batch union (inactive rows are
     masked loads, which fetch no memory) and writes act = g_masked * up(x).
Without WITH_UP it writes g_masked. Either way it writes the union flags that the down kernel
reads, and it zeroes the down kernel's split-K workspace, which saves a memset launch.
With COMPACT, each program also writes the union-active neuron ids of its block, packed at the
front of its BLOCK_I-slot segment of ``idx``, and their number into ``bcount[pid]``: the fused
up + down kernel (updown.py) turns those into one dense list of active neurons, so its work
scales with the active count (no atomics counter, so nothing has to be zeroed first).
With INT8 the weights are int8 rows (int8.py): each finished dot product is multiplied by its
row's scale.
"""

import torch
import triton
import triton.language as tl

from .int8 import Int8Matrix, Weight
from .runtime import interpreter_enabled, on_tensor_device
from .validate import (
    check_counter,
    check_index_range,
    check_input,
    check_matrix,
    check_neuron_scale,
    check_threshold,
)
from .widen import widen


@triton.jit
def _cats_gate_kernel(
    x_ptr,  # [B, H] activations, row-major
    wg_ptr,  # [I, H] W_gate
    wu_ptr,  # [I, H] W_up (unused without WITH_UP)
    thr_ptr,  # [B] float32 thresholds
    scale_ptr,  # [I] float32 per-neuron weights of the criterion (read with HAS_SCALE)
    qg_ptr,  # [I] float32 int8 scales of W_gate's rows (read with INT8)
    qu_ptr,  # [I] float32 int8 scales of W_up's rows (read with INT8 and WITH_UP)
    act_ptr,  # [B, I] float32 out: g_masked, or g_masked * up with WITH_UP
    flags_ptr,  # [I] int8 out: 1 where the neuron is active for some row
    count_ptr,  # [B + 1] int32, added into: per-row counts, then the union count
    zf_ptr,  # float32 workspace to zero (down kernel's split-K accumulator)
    zi_ptr,  # int32 workspace to zero (down kernel's tickets)
    idx_ptr,  # [n_programs * BLOCK_I] int32 out (COMPACT): active neuron ids, packed per block
    bcount_ptr,  # [n_programs] int32 out (COMPACT): active neurons per block
    B, H, inter, n_zf, n_zi,
    BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
    WITH_UP: tl.constexpr, COUNT: tl.constexpr, ZERO_BLOCK: tl.constexpr,
    COMPACT: tl.constexpr, NUM_STAGES: tl.constexpr, HAS_SCALE: tl.constexpr,
    INT8: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rn = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    n_ok = rn < inter
    rb0 = tl.arange(0, BLOCK_B)
    rh0 = tl.arange(0, BLOCK_H)

    if ZERO_BLOCK > 0:
        # Each program zeroes its own slice; the down kernel runs after this one on the stream.
        rz = pid * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(zf_ptr + rz, tl.zeros([ZERO_BLOCK], dtype=tl.float32), mask=rz < n_zf)
        tl.store(zi_ptr + rz, tl.zeros([ZERO_BLOCK], dtype=tl.int32), mask=rz < n_zi)

    # Phase 0: gate, SiLU, threshold, counts, g_masked. Phase 1 (WITH_UP): up for the
    # union-active rows only, times g_masked. Rows of the batch go in chunks of BLOCK_B.
    if HAS_SCALE:
        s = tl.load(scale_ptr + rn, mask=n_ok, other=1.0)
    if INT8:
        qg = tl.load(qg_ptr + rn, mask=n_ok, other=0.0)
        if WITH_UP:
            qu = tl.load(qu_ptr + rn, mask=n_ok, other=0.0)
    union = tl.zeros([BLOCK_I], dtype=tl.int32)
    for phase in tl.static_range(2 if WITH_UP else 1):
        if phase == 0:
            w_ptr = wg_ptr
            row_ok = n_ok
        else:
            tl.debug_barrier()  # g_masked is re-read by threads that may not have written it
            w_ptr = wu_ptr
            row_ok = union != 0  # inactive rows: masked loads, no memory traffic
        for b0 in range(0, B, BLOCK_B):
            rb = b0 + rb0
            b_ok = rb < B
            # The product is accumulated in a 3-D tile and reduced once after the loop, so
            # the loop body is loads and FMAs only.
            acc = tl.zeros([BLOCK_B, BLOCK_I, BLOCK_H], dtype=tl.float32)
            # An explicit num_stages makes Triton software-pipeline these loads (it only does
            # so by default for loads feeding tl.dot): more bytes in flight per program.
            for h0 in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
                rh = h0 + rh0
                h_ok = rh < H
                w = tl.load(
                    w_ptr + rn[:, None] * H + rh[None, :],
                    mask=row_ok[:, None] & h_ok[None, :],
                    other=0.0,
                )
                xv = tl.load(
                    x_ptr + rb[:, None] * H + rh[None, :],
                    mask=b_ok[:, None] & h_ok[None, :],
                    other=0.0,
                )
                acc += xv.to(tl.float32)[:, None, :] * widen(w, INT8)[None, :, :]
            dots = tl.sum(acc, axis=2)  # [BLOCK_B, BLOCK_I]
            if INT8:  # the rows' scales, once per finished sum
                dots = dots * (qg[None, :] if phase == 0 else qu[None, :])
            ptrs = act_ptr + rb[:, None] * inter + rn[None, :]
            m = b_ok[:, None] & n_ok[None, :]
            if phase == 0:
                g = dots * tl.sigmoid(dots)
                # Padding rows get +inf so they are never active.
                t = tl.load(thr_ptr + rb, mask=b_ok, other=float("inf"))
                score = tl.abs(g) * s[None, :] if HAS_SCALE else tl.abs(g)
                active = (score > t[:, None]) & n_ok[None, :]
                active_i = active.to(tl.int32)
                union = tl.maximum(union, tl.max(active_i, axis=0))
                if COUNT:
                    tl.atomic_add(
                        count_ptr + rb, tl.sum(active_i, axis=1), mask=b_ok, sem="relaxed"
                    )
                tl.store(ptrs, tl.where(active, g, 0.0), mask=m)
            else:
                g_masked = tl.load(ptrs, mask=m, other=0.0)
                tl.store(ptrs, g_masked * dots, mask=m)
        if phase == 0:
            if COUNT:
                tl.atomic_add(count_ptr + B, tl.sum(union, axis=0), sem="relaxed")
            tl.store(flags_ptr + rn, union.to(tl.int8), mask=n_ok)
            if COMPACT:
                # Exclusive prefix sum of the flags = slot of each active neuron in the block.
                slot = tl.cumsum(union, axis=0) - union
                tl.store(idx_ptr + pid * BLOCK_I + slot, rn, mask=union != 0)
                tl.store(bcount_ptr + pid, tl.sum(union, axis=0))


def gate_config(batch_size: int) -> dict:
    """Tile sizes for the gate kernel: BLOCK_B rows per chunk, BLOCK_I neurons per program.

    The 3-D fp32 accumulator holds BLOCK_B * BLOCK_I * BLOCK_H = 8192 values (64 per thread),
    and BLOCK_H stays wide so each program needs few (latency-bound) loop steps. Figures chosen
    on the H200 sweep recorded in benchmarks/notes_mlp.md. Under the interpreter, larger
    tiles mean fewer (slow, Python-level) programs.
    """
    block_b = min(triton.next_power_of_2(batch_size), 16)
    if interpreter_enabled():
        return dict(BLOCK_B=block_b, BLOCK_I=32, BLOCK_H=64, NUM_STAGES=1, num_warps=4)
    if block_b == 1:
        return dict(BLOCK_B=1, BLOCK_I=32, BLOCK_H=256, NUM_STAGES=3, num_warps=4)
    return dict(
        BLOCK_B=block_b, BLOCK_I=max(1, 16 // block_b), BLOCK_H=512, NUM_STAGES=3, num_warps=4
    )


@on_tensor_device
def launch_gate(
    x: torch.Tensor,
    w_gate: Weight,
    w_up: Weight | None,
    threshold: torch.Tensor,
    active_count: torch.Tensor | None,
    zero_f32: torch.Tensor | None = None,
    zero_i32: torch.Tensor | None = None,
    config: dict | None = None,
    compact: tuple[torch.Tensor, torch.Tensor] | None = None,
    neuron_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the gate kernel on already validated arguments; returns (act [B, I] fp32, flags).

    compact: optional (idx, bcount) from ``compact_buffers``, filled with the packed active ids.
    neuron_scale: optional float32 [I], the criterion's per-neuron weights.
    w_gate, w_up: full-precision [I, H] of x's dtype, or both int8 (`Int8Matrix`, untransposed).
    """
    B, H = x.shape
    int8 = isinstance(w_gate, Int8Matrix)
    q_gate, q_up = (w_gate.q, w_up.q if w_up is not None else None) if int8 else (w_gate, w_up)
    inter = q_gate.shape[0]
    cfg = dict(config or gate_config(B))
    act = torch.empty((B, inter), device=x.device, dtype=torch.float32)
    flags = torch.empty((inter,), device=x.device, dtype=torch.int8)
    grid = (triton.cdiv(inter, cfg["BLOCK_I"]),)
    n_zf = zero_f32.numel() if zero_f32 is not None else 0
    n_zi = zero_i32.numel() if zero_i32 is not None else 0
    n_zero = max(n_zf, n_zi)
    zero_block = triton.next_power_of_2(triton.cdiv(n_zero, grid[0])) if n_zero else 0
    _cats_gate_kernel[grid](
        x,
        q_gate,
        q_up if q_up is not None else q_gate,
        threshold,
        neuron_scale if neuron_scale is not None else threshold,
        w_gate.scale if int8 else threshold,
        w_up.scale if int8 and w_up is not None else threshold,
        act,
        flags,
        active_count if active_count is not None else flags,
        zero_f32 if zero_f32 is not None else act,
        zero_i32 if zero_i32 is not None else flags,
        compact[0] if compact is not None else flags,
        compact[1] if compact is not None else flags,
        B,
        H,
        inter,
        n_zf,
        n_zi,
        WITH_UP=w_up is not None,
        COUNT=active_count is not None,
        ZERO_BLOCK=zero_block,
        COMPACT=compact is not None,
        HAS_SCALE=neuron_scale is not None,
        INT8=int8,
        **cfg,
    )
    return act, flags


def compact_buffers(
    inter: int, device: torch.device, config: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (idx [n_blocks * BLOCK_I], bcount [n_blocks]) int32 for a COMPACT launch."""
    n_blocks = triton.cdiv(inter, config["BLOCK_I"])
    idx = torch.empty(n_blocks * config["BLOCK_I"], device=device, dtype=torch.int32)
    bcount = torch.empty(n_blocks, device=device, dtype=torch.int32)
    return idx, bcount


def check_gate_args(x, w_gate, threshold, active_count, neuron_scale):
    check_input("x", x)
    B, H = x.shape
    inter = w_gate.shape[0] if isinstance(w_gate, torch.Tensor) and w_gate.dim() == 2 else -1
    check_matrix("w_gate", w_gate, inter, H, x)
    check_threshold("threshold", threshold, B, x.device)
    check_neuron_scale("neuron_scale", neuron_scale, inter, x.device)
    check_counter("active_count", active_count, B + 1, x.device)
    check_index_range(H, inter, B)


def cats_gate(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    threshold: torch.Tensor,
    *,
    active_count: torch.Tensor | None = None,
    neuron_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gate: CATS_t(SiLU(x @ w_gate^T)) per row.

    x [B, H], w_gate [I, H] (same dtype/device, contiguous), threshold [B] float32.
    Returns g_masked [B, I] float32 (0 where |g| * s_i <= t_b) and union flags [I] int8.
    active_count (optional, int32 [B + 1]) gets per-row counts and the union count added.
    neuron_scale (optional, float32 [I]) weights the criterion per neuron (s_i; default 1).
    """
    check_gate_args(x, w_gate, threshold, active_count, neuron_scale)
    return launch_gate(x, w_gate, None, threshold, active_count, neuron_scale=neuron_scale)
