"""Sparse up + down for decode, over the packed list of union-active neurons.

The gate kernel (gate.py, COMPACT) leaves, per gate block of SEG neurons, the ids of its
union-active neurons packed at the front of the block's SEG slots (``idx``) and their number
(``bcount``). Position p of the dense active list is slot p - excl(b) of the block b whose
neurons cover p (excl/incl: exclusive/inclusive prefix sums of bcount).

Grid: cdiv(I, BLOCK_K) programs, the worst case (every neuron active); program j takes list
positions [j*BLOCK_K, (j+1)*BLOCK_K) and programs past the end of the list exit at once, so the
work follows the active count with no host synchronisation.

One threshold: one fused kernel. A program
  1. finds its positions' neuron ids (prefix sums of bcount, computed by every program);
  2. reads those neurons' W_up rows in full: up = x @ W_up[ids]^T, a = g_masked * up (fp32);
  3. reads the same neurons' W_down^T rows and adds a @ W_down^T[ids] into a zeroed fp32 [B, H]
     workspace with relaxed fp32 atomics (no fp16 atomics);
  4. takes a ticket; the last program casts the workspace to the output dtype.
Two thresholds (a row keeps a_i only where |a_i| > down_thr[b]), two forms chosen by the
config's TWO_KERNELS:
  fused (TWO_KERNELS False): the one kernel above zeroes the a_i no row keeps and masks those
    neurons' W_down rows out of step 3's loads (a program none of whose neurons is kept skips
    step 3), so nothing is written back and no second launch is made;
  split (TWO_KERNELS True): steps 2 and 3 are two kernels, so that the down work follows the
    down-active count rather than the up-active one. The up kernel writes a (0 where no row
    keeps it) over g_masked, and packs the neurons kept by some row of the batch at the front
    of its BLOCK_K slots, with their number per program: the same list form as the gate's,
    which the down kernel walks as in step 1.
Either form with COUNT_DOWN counts the kept neurons per row and over the batch (down_count
[B + 1], added into).
With INT8 both matrices are int8 (int8.py; W_down stored transposed, so a neuron's weights are
still one row): an up sum is multiplied by its row's scale, and the last program multiplies
each output by its channel's scale while casting.
The workspace and the ticket are zeroed by the gate kernel, so a decode step is two launches
(three with split two thresholds).
"""

import torch
import triton
import triton.language as tl

from .int8 import Int8Matrix, Weight
from .runtime import interpreter_enabled, on_tensor_device
from .widen import widen

try:  # programmatic dependent launch (Hopper+): hides the gap between gate and this kernel
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:  # pragma: no cover - older Triton
    _gdc_wait = None


@triton.jit
def _list_ids(
    pid, idx_ptr, bcount_ptr, n_blocks, SEG, BLOCK_K: tl.constexpr, SCAN_BLOCK: tl.constexpr
):
    """Neuron ids at list positions [pid*BLOCK_K, (pid+1)*BLOCK_K), their validity, and the
    list's length: the block of each position is the number of blocks whose inclusive prefix
    is <= p, and that block's exclusive prefix is the largest inclusive prefix <= p."""
    rk = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    blk = tl.zeros([BLOCK_K], dtype=tl.int32)
    excl = tl.zeros([BLOCK_K], dtype=tl.int32)
    total = pid * 0
    for c0 in range(0, n_blocks, SCAN_BLOCK):
        rc = c0 + tl.arange(0, SCAN_BLOCK)
        bc = tl.load(bcount_ptr + rc, mask=rc < n_blocks, other=0)
        incl = tl.cumsum(bc, axis=0) + total
        le = incl[None, :] <= rk[:, None]
        blk += tl.sum(le.to(tl.int32), axis=1)
        excl = tl.maximum(excl, tl.max(tl.where(le, incl[None, :], 0), axis=1))
        total += tl.sum(bc, axis=0)
    k_ok = rk < total
    ids = tl.load(idx_ptr + blk * SEG + (rk - excl), mask=k_ok, other=0)
    return ids, k_ok, total


@triton.jit
def _up_rows(x_ptr, wu_ptr, ids, k_ok, qu, rb, b_ok, H,
             BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
             NUM_STAGES: tl.constexpr, INT8: tl.constexpr):  # fmt: skip
    """up [BLOCK_B, BLOCK_K] = x[rb] @ W_up[ids]^T in fp32, full hidden dim; the 3-D tile is
    reduced once after the loop."""
    rh0 = tl.arange(0, BLOCK_H)
    up3 = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_H], dtype=tl.float32)
    for h0 in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
        rh = h0 + rh0
        h_ok = rh < H
        w = tl.load(
            wu_ptr + ids[:, None] * H + rh[None, :],
            mask=k_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        xv = tl.load(
            x_ptr + rb[:, None] * H + rh[None, :],
            mask=b_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        up3 += xv.to(tl.float32)[:, None, :] * widen(w, INT8)[None, :, :]
    up = tl.sum(up3, axis=2)
    if INT8:
        up = up * qu[None, :]
    return up


@triton.jit
def _down_rows(wd_ptr, acc_ptr, a, ids, k_ok, rb, b_ok, H,
               BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr, INT8: tl.constexpr):  # fmt: skip
    """acc[rb] += a @ W_down^T[ids] (relaxed fp32 atomics), a [BLOCK_B, BLOCK_K]."""
    rh0 = tl.arange(0, BLOCK_H)
    for h0 in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
        rh = h0 + rh0
        h_ok = rh < H
        w = tl.load(
            wd_ptr + ids[:, None] * H + rh[None, :],
            mask=k_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        part = tl.sum(a[:, :, None] * widen(w, INT8)[None, :, :], axis=1)
        tl.atomic_add(
            acc_ptr + rb[:, None] * H + rh[None, :],
            part,
            mask=b_ok[:, None] & h_ok[None, :],
            sem="relaxed",
        )


@triton.jit
def _finish(acc_ptr, ticket_ptr, out_ptr, qd_ptr, n_programs, B, H,
            CAST_BLOCK: tl.constexpr, INT8: tl.constexpr):  # fmt: skip
    """Take a ticket; the last program casts the workspace to out (times W_down's channel
    scales with INT8). All threads' atomics are issued before the ticket; the acq_rel ticket
    orders them before the last program's reads (which bypass L1 with .cg)."""
    tl.debug_barrier()
    done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if done == n_programs - 1:
        n = B * H
        for i0 in range(0, n, CAST_BLOCK):
            ri = i0 + tl.arange(0, CAST_BLOCK)
            v = tl.load(acc_ptr + ri, mask=ri < n, other=0.0, cache_modifier=".cg")
            if INT8:  # W_down's scale of each output channel, once per finished sum
                v = v * tl.load(qd_ptr + ri % H, mask=ri < n, other=0.0)
            tl.store(out_ptr + ri, v.to(out_ptr.dtype.element_ty), mask=ri < n)


@triton.jit
def _cats_up_down_kernel(
    x_ptr,  # [B, H] activations
    wu_ptr,  # [I, H] W_up
    wd_ptr,  # [I, H] W_down transposed
    g_ptr,  # [B, I] float32 g_masked (0 where inactive for that row)
    idx_ptr,  # [n_blocks * SEG] int32 active ids, packed per gate block
    bcount_ptr,  # [n_blocks] int32 active ids per gate block
    acc_ptr,  # [B, H] float32 workspace, zeroed before launch
    ticket_ptr,  # [1] int32, zeroed before launch
    out_ptr,  # [B, H] output, x.dtype
    qu_ptr,  # [I] float32 int8 scales of W_up's rows (read with INT8)
    qd_ptr,  # [H] float32 int8 scales of W_down's output channels (read with INT8)
    dthr_ptr,  # [B] float32 down thresholds (read with TWO)
    dcount_ptr,  # [B + 1] int32 down-active counts, added into (with COUNT_DOWN)
    B, H, inter, n_blocks,
    SEG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, CAST_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr, INT8: tl.constexpr, TWO: tl.constexpr, COUNT_DOWN: tl.constexpr,
):  # fmt: skip
    """Up and down of the listed neurons in one kernel; with TWO, W_down rows of neurons no
    row keeps are masked out of the loads."""
    if USE_PDL:
        _gdc_wait()  # the gate kernel's outputs are visible after this
    pid = tl.program_id(0)
    ids, k_ok, total = _list_ids(pid, idx_ptr, bcount_ptr, n_blocks, SEG, BLOCK_K, SCAN_BLOCK)
    # Program 0 always runs, so that with no active neuron it still casts (zeros) to out.
    n_programs = tl.maximum(tl.cdiv(total, BLOCK_K), 1)
    if pid < n_programs:
        qu = tl.zeros([BLOCK_K], dtype=tl.float32)  # the rows' int8 scales (INT8 only)
        if INT8:
            qu = tl.load(qu_ptr + ids, mask=k_ok, other=0.0)
        rb0 = tl.arange(0, BLOCK_B)
        down_union = tl.zeros([BLOCK_K], dtype=tl.int32)
        for b0 in range(0, B, BLOCK_B):
            rb = b0 + rb0
            b_ok = rb < B
            m = b_ok[:, None] & k_ok[None, :]
            g = tl.load(g_ptr + rb[:, None] * inter + ids[None, :], mask=m, other=0.0)
            a = g * _up_rows(x_ptr, wu_ptr, ids, k_ok, qu, rb, b_ok, H,
                             BLOCK_B, BLOCK_K, BLOCK_H, NUM_STAGES, INT8)  # fmt: skip
            down_ok = k_ok
            if TWO:
                td = tl.load(dthr_ptr + rb, mask=b_ok, other=float("inf"))
                kept = (tl.abs(a) > td[:, None]) & m
                kept_i = kept.to(tl.int32)
                a = tl.where(kept, a, 0.0)
                chunk_union = tl.max(kept_i, axis=0)
                down_union = tl.maximum(down_union, chunk_union)
                if COUNT_DOWN:
                    tl.atomic_add(dcount_ptr + rb, tl.sum(kept_i, axis=1), mask=b_ok, sem="relaxed")
                down_ok = k_ok & (chunk_union != 0)
            if tl.sum(down_ok.to(tl.int32), axis=0) > 0:  # no W_down row to read: nothing to add
                _down_rows(wd_ptr, acc_ptr, a, ids, down_ok, rb, b_ok, H,
                           BLOCK_H, NUM_STAGES, INT8)  # fmt: skip
        if COUNT_DOWN:
            tl.atomic_add(dcount_ptr + B, tl.sum(down_union, axis=0), sem="relaxed")
        _finish(acc_ptr, ticket_ptr, out_ptr, qd_ptr, n_programs, B, H, CAST_BLOCK, INT8)


@triton.jit
def _cats_up_kernel(
    x_ptr,  # [B, H] activations
    wu_ptr,  # [I, H] W_up
    g_ptr,  # [B, I] float32 g_masked in; a where some row keeps the neuron, else 0, out
    idx_ptr,  # [n_blocks * SEG] int32 active ids, packed per gate block
    bcount_ptr,  # [n_blocks] int32 active ids per gate block
    didx_ptr,  # [n_programs * BLOCK_K] int32 out: down-active ids, packed per program
    dbcount_ptr,  # [n_programs] int32 out: down-active ids per program
    dthr_ptr,  # [B] float32 down thresholds
    dcount_ptr,  # [B + 1] int32 down-active counts, added into (with COUNT_DOWN)
    qu_ptr,  # [I] float32 int8 scales of W_up's rows (read with INT8)
    B, H, inter, n_blocks,
    SEG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
    COUNT_DOWN: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    """Two thresholds, first half: up rows of the listed neurons, a, the down masks."""
    if USE_PDL:
        _gdc_wait()
    pid = tl.program_id(0)
    ids, k_ok, total = _list_ids(pid, idx_ptr, bcount_ptr, n_blocks, SEG, BLOCK_K, SCAN_BLOCK)
    down_union = tl.zeros([BLOCK_K], dtype=tl.int32)
    if pid * BLOCK_K < total:
        qu = tl.zeros([BLOCK_K], dtype=tl.float32)  # the rows' int8 scales (INT8 only)
        if INT8:
            qu = tl.load(qu_ptr + ids, mask=k_ok, other=0.0)
        rb0 = tl.arange(0, BLOCK_B)
        for b0 in range(0, B, BLOCK_B):
            rb = b0 + rb0
            b_ok = rb < B
            ptrs = g_ptr + rb[:, None] * inter + ids[None, :]
            m = b_ok[:, None] & k_ok[None, :]
            g = tl.load(ptrs, mask=m, other=0.0)
            a = g * _up_rows(x_ptr, wu_ptr, ids, k_ok, qu, rb, b_ok, H,
                             BLOCK_B, BLOCK_K, BLOCK_H, NUM_STAGES, INT8)  # fmt: skip
            td = tl.load(dthr_ptr + rb, mask=b_ok, other=float("inf"))
            kept = (tl.abs(a) > td[:, None]) & m
            kept_i = kept.to(tl.int32)
            tl.store(ptrs, tl.where(kept, a, 0.0), mask=m)
            down_union = tl.maximum(down_union, tl.max(kept_i, axis=0))
            if COUNT_DOWN:
                tl.atomic_add(dcount_ptr + rb, tl.sum(kept_i, axis=1), mask=b_ok, sem="relaxed")
        if COUNT_DOWN:
            tl.atomic_add(dcount_ptr + B, tl.sum(down_union, axis=0), sem="relaxed")
        # Exclusive prefix sum of the union flags = slot of each kept neuron in the segment.
        slot = tl.cumsum(down_union, axis=0) - down_union
        tl.store(didx_ptr + pid * BLOCK_K + slot, ids, mask=down_union != 0)
    # Every program writes its count (0 past the list), so nothing needs zeroing first.
    tl.store(dbcount_ptr + pid, tl.sum(down_union, axis=0))


@triton.jit
def _cats_down_kernel(
    wd_ptr,  # [I, H] W_down transposed
    a_ptr,  # [B, I] float32 a from the up kernel (read at the listed neurons)
    didx_ptr,  # [n_blocks * BLOCK_K] int32 down-active ids, packed per up program
    dbcount_ptr,  # [n_blocks] int32 down-active ids per up program
    acc_ptr,  # [B, H] float32 workspace, zeroed before launch
    ticket_ptr,  # [1] int32, zeroed before launch
    out_ptr,  # [B, H] output, x.dtype
    qd_ptr,  # [H] float32 int8 scales of W_down's output channels (read with INT8)
    B, H, inter, n_blocks,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, CAST_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    """Two thresholds, second half: W_down rows of the down-active neurons only."""
    if USE_PDL:
        _gdc_wait()
    pid = tl.program_id(0)
    ids, k_ok, total = _list_ids(pid, didx_ptr, dbcount_ptr, n_blocks, BLOCK_K, BLOCK_K,
                                 SCAN_BLOCK)  # fmt: skip
    n_programs = tl.maximum(tl.cdiv(total, BLOCK_K), 1)
    if pid < n_programs:
        rb0 = tl.arange(0, BLOCK_B)
        for b0 in range(0, B, BLOCK_B):
            rb = b0 + rb0
            b_ok = rb < B
            a = tl.load(
                a_ptr + rb[:, None] * inter + ids[None, :],
                mask=b_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            _down_rows(wd_ptr, acc_ptr, a, ids, k_ok, rb, b_ok, H, BLOCK_H, NUM_STAGES, INT8)
        _finish(acc_ptr, ticket_ptr, out_ptr, qd_ptr, n_programs, B, H, CAST_BLOCK, INT8)


def updown_config(batch_size: int, dtype: torch.dtype | None = None) -> dict:
    """Tiles: BLOCK_K listed neurons x BLOCK_H columns per step, BLOCK_B batch rows per chunk.

    The 3-D fp32 tile BLOCK_B * BLOCK_K * BLOCK_H stays at 8192 values (64 per thread). At
    B = 1, 16 neurons x 512 columns: 8 steps per matrix, and ~344 programs at 50% sparsity on
    Llama-2-7B (about 2.6 per SM, one wave). Chosen on the H200 runs in notes_mlp.md.
    float32 activations take at most 8 rows a chunk: compiled with 16 (H100 and H200, Triton
    3.6) the float32 output was off by ~7e-4 of its largest value, exact with 8 (cause inside
    the compiler not found; results/sparse_fp32_error_h100_2026-12-07.json).
    """
    cap = 8 if dtype == torch.float32 else 16
    block_b = min(triton.next_power_of_2(batch_size), cap)
    if interpreter_enabled():
        return dict(
            BLOCK_B=block_b, BLOCK_K=16, BLOCK_H=64, SCAN_BLOCK=64, CAST_BLOCK=256,
            NUM_STAGES=1, num_warps=4, USE_PDL=False, TWO_KERNELS=True,
        )  # fmt: skip
    return dict(
        BLOCK_B=block_b,
        BLOCK_K=16,
        BLOCK_H=max(32, 8192 // (16 * block_b)),
        SCAN_BLOCK=512,
        CAST_BLOCK=4096,
        NUM_STAGES=4,
        num_warps=4,
        USE_PDL=False,
        TWO_KERNELS=True,
    )


def updown_workspace(
    batch_size: int, hidden: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised fp32 [B * H] workspace and int32 [1] ticket; zero both before launch
    (the gate kernel does it for free)."""
    acc = torch.empty(batch_size * hidden, device=device, dtype=torch.float32)
    ticket = torch.empty(1, device=device, dtype=torch.int32)
    return acc, ticket


@on_tensor_device
def launch_updown(
    x: torch.Tensor,
    w_up: Weight,
    w_down_t: Weight,
    g_masked: torch.Tensor,
    idx: torch.Tensor,
    bcount: torch.Tensor,
    acc: torch.Tensor,
    ticket: torch.Tensor,
    config: dict,
    down_threshold: torch.Tensor | None = None,
    down_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch on validated arguments; (idx, bcount) from a COMPACT gate launch whose block size
    is idx.numel() // bcount.numel(); acc/ticket zeroed. down_threshold: optional float32 [B]
    (two-threshold mode: the up and the down kernel; g_masked is overwritten with a);
    down_count: optional int32 [B + 1], added into. Returns out [B, H] in x.dtype. w_up,
    w_down_t: full precision [I, H], or both int8 (W_up untransposed, W_down stored
    transposed)."""
    B, H = x.shape
    int8 = isinstance(w_up, Int8Matrix)
    q_up, q_down = (w_up.q, w_down_t.q) if int8 else (w_up, w_down_t)
    inter = q_up.shape[0]
    cfg = dict(config)
    use_pdl = bool(cfg.pop("USE_PDL")) and _gdc_wait is not None and x.device.type == "cuda"
    extra = dict(launch_pdl=True) if use_pdl else {}
    out = torch.empty((B, H), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(inter, cfg["BLOCK_K"]),)
    shape = dict(B=B, H=H, inter=inter, n_blocks=bcount.numel())
    q_up_scale = w_up.scale if int8 else acc
    q_down_scale = w_down_t.scale if int8 else acc
    seg = idx.numel() // bcount.numel()
    two_kernels = bool(cfg.pop("TWO_KERNELS"))
    two = down_threshold is not None
    if not (two and two_kernels):
        _cats_up_down_kernel[grid](
            x, q_up, q_down, g_masked, idx, bcount, acc, ticket, out, q_up_scale, q_down_scale,
            down_threshold if two else acc, down_count if down_count is not None else ticket,
            **shape, SEG=seg, USE_PDL=use_pdl, INT8=int8, TWO=two,
            COUNT_DOWN=down_count is not None, **cfg, **extra,
        )  # fmt: skip
        return out
    didx = torch.empty(grid[0] * cfg["BLOCK_K"], device=x.device, dtype=torch.int32)
    dbcount = torch.empty(grid[0], device=x.device, dtype=torch.int32)
    cast_block = cfg.pop("CAST_BLOCK")
    _cats_up_kernel[grid](
        x, q_up, g_masked, idx, bcount, didx, dbcount, down_threshold,
        down_count if down_count is not None else ticket, q_up_scale,
        **shape, SEG=seg, USE_PDL=use_pdl, COUNT_DOWN=down_count is not None, INT8=int8,
        **cfg, **extra,
    )  # fmt: skip
    _cats_down_kernel[grid](
        q_down, g_masked, didx, dbcount, acc, ticket, out, q_down_scale,
        **dict(shape, n_blocks=grid[0]), USE_PDL=use_pdl, INT8=int8, CAST_BLOCK=cast_block,
        **cfg, **extra,
    )  # fmt: skip
    return out
