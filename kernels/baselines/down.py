"""Sparse down projection for decode: out = act @ W_down^T, reading only union-active rows.

W_down is stored transposed once at load as ``w_down_t`` [I, H], so neuron n's output weights
are the contiguous row n and a skipped neuron is a skipped contiguous 2*H-byte row.

Grid (H / BLOCK_H, n_split): program (h, k) owns output columns [h*BLOCK_H, +BLOCK_H) and the
k-th of n_split slices of BLOCK_N * ITERS neurons. Inactive rows are masked loads (no memory
traffic). With n_split > 1 the partial sums go, in fp32, through relaxed fp32 atomics into a
zeroed fp32 workspace; the last of the n_split programs of a column block (a per-block ticket
counter) casts that block to the output dtype, so no extra launch and no fp16 atomics.
"""

import torch
import triton
import triton.language as tl

from ..runtime import interpreter_enabled, on_tensor_device
from ..validate import check_index_range, check_matrix


@triton.jit
def _cats_down_kernel(
    act_ptr,  # [B, I] float32 activations (0 where inactive)
    flags_ptr,  # [I] int8 union flags
    wd_ptr,  # [I, H] W_down transposed
    acc_ptr,  # [B, H] float32 split-K workspace, zeroed before launch (n_split > 1)
    ticket_ptr,  # [cdiv(H, BLOCK_H)] int32, zeroed before launch (n_split > 1)
    out_ptr,  # [B, H] output, x.dtype
    B, H, inter, n_split,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, ITERS: tl.constexpr,
    NUM_STAGES: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    pid_h = tl.program_id(0)
    pid_k = tl.program_id(1)
    rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = rh < H
    rb0 = tl.arange(0, BLOCK_B)
    n_start = pid_k * (BLOCK_N * ITERS)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + rb0
        b_ok = rb < B
        acc = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_H], dtype=tl.float32)
        # Few steps per program and many programs, or more steps with the loop's loads
        # software-pipelined (explicit num_stages): either keeps bytes in flight when most
        # rows are masked off.
        for k in tl.range(0, ITERS, num_stages=NUM_STAGES):
            rn = n_start + k * BLOCK_N + tl.arange(0, BLOCK_N)
            on = tl.load(flags_ptr + rn, mask=rn < inter, other=0) != 0
            w = tl.load(
                wd_ptr + rn[:, None] * H + rh[None, :], mask=on[:, None] & h_ok[None, :], other=0.0
            )
            a = tl.load(
                act_ptr + rb[:, None] * inter + rn[None, :],
                mask=b_ok[:, None] & on[None, :],
                other=0.0,
            )
            acc += a[:, :, None] * w.to(tl.float32)[None, :, :]
        part = tl.sum(acc, axis=1)  # [BLOCK_B, BLOCK_H]
        offs = rb[:, None] * H + rh[None, :]
        m = b_ok[:, None] & h_ok[None, :]
        if ATOMIC:
            tl.atomic_add(acc_ptr + offs, part, mask=m, sem="relaxed")
        else:
            tl.store(out_ptr + offs, part.to(out_ptr.dtype.element_ty), mask=m)
    if ATOMIC:
        # All threads' atomics are issued before the ticket; the acq_rel ticket orders them
        # before the last program's reads (which bypass L1 with .cg).
        tl.debug_barrier()
        done = tl.atomic_add(ticket_ptr + pid_h, 1, sem="acq_rel")
        # Broadcast to a full tensor: the ticket is a scalar, the mask below is 2-D.
        is_last = (tl.zeros_like(rh) + done) == n_split - 1
        for b0 in range(0, B, BLOCK_B):
            rb = b0 + rb0
            offs = rb[:, None] * H + rh[None, :]
            m = (rb < B)[:, None] & (h_ok & is_last)[None, :]
            total = tl.load(acc_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=m)


def down_config(batch_size: int) -> dict:
    """Tile sizes: BLOCK_N neurons x BLOCK_H columns per step, ITERS steps per program.

    The grid is (H / BLOCK_H, I / (BLOCK_N * ITERS)); each program's partial sums go through
    fp32 atomics, BLOCK_B * H of them per program, so larger batches take more steps per
    program. The 3-D accumulator stays at 64 fp32 values per thread. Chosen on the H200 sweep
    in benchmarks/notes_mlp.md. Under the interpreter, large tiles keep the program count low.
    """
    block_b = min(triton.next_power_of_2(batch_size), 16)
    if interpreter_enabled():
        return dict(BLOCK_B=block_b, BLOCK_N=32, BLOCK_H=64, ITERS=2, NUM_STAGES=1, num_warps=4)
    block_n = max(2, 32 // block_b)
    return dict(
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        BLOCK_H=256,
        ITERS=32 // block_n,
        NUM_STAGES=1,
        num_warps=4,
    )


def down_split(inter: int, config: dict) -> int:
    """Number of neuron slices (programs per column block) for ``config``."""
    return triton.cdiv(inter, config["BLOCK_N"] * config["ITERS"])


def down_workspace(
    batch_size: int, hidden: int, inter: int, device: torch.device, config: dict
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Uninitialised split-K workspace (fp32 [B * H], int32 tickets) or (None, None) if unused.

    Whoever launches the down kernel must zero both first (the gate kernel does it for free).
    """
    if down_split(inter, config) == 1:
        return None, None
    acc = torch.empty(batch_size * hidden, device=device, dtype=torch.float32)
    tickets = torch.empty(triton.cdiv(hidden, config["BLOCK_H"]), device=device, dtype=torch.int32)
    return acc, tickets


@on_tensor_device
def launch_down(
    act: torch.Tensor,
    flags: torch.Tensor,
    w_down_t: torch.Tensor,
    out_dtype: torch.dtype,
    acc: torch.Tensor | None,
    tickets: torch.Tensor | None,
    config: dict,
) -> torch.Tensor:
    """Launch on validated arguments with a zeroed workspace from ``down_workspace``."""
    B, inter = act.shape
    H = w_down_t.shape[1]
    n_split = down_split(inter, config)
    out = torch.empty((B, H), device=act.device, dtype=out_dtype)
    grid = (triton.cdiv(H, config["BLOCK_H"]), n_split)
    _cats_down_kernel[grid](
        act,
        flags,
        w_down_t,
        acc if acc is not None else act,
        tickets if tickets is not None else flags,
        out,
        B,
        H,
        inter,
        n_split,
        ATOMIC=n_split > 1,
        **config,
    )
    return out


def cats_down(
    act: torch.Tensor, flags: torch.Tensor, w_down_t: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out [B, H] (out_dtype) = act [B, I] @ w_down_t [I, H] over the neurons flagged in ``flags``.

    act: float32 [B, I], contiguous; flags: int8 [I] (nonzero = read this row); w_down_t: [I, H]
    contiguous, on act's device. Rows with flag 0 are never read, so act must be 0 there for
    the result to equal the dense product.
    """
    if not isinstance(act, torch.Tensor) or act.dim() != 2:
        raise ValueError("act must be a 2-D float32 tensor [B, I]")
    if act.dtype != torch.float32 or not act.is_contiguous():
        raise ValueError(f"act must be contiguous float32, got {act.dtype}")
    B, inter = act.shape
    if not isinstance(w_down_t, torch.Tensor) or w_down_t.dim() != 2:
        raise ValueError("w_down_t must be a 2-D tensor [I, H]")
    if w_down_t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"w_down_t has unsupported dtype {w_down_t.dtype}")
    check_matrix("w_down_t", w_down_t, inter, w_down_t.shape[1], w_down_t)
    if w_down_t.device != act.device:
        raise ValueError(f"w_down_t must be on {act.device}, got {w_down_t.device}")
    if not isinstance(flags, torch.Tensor) or tuple(flags.shape) != (inter,):
        raise ValueError(f"flags must have shape [{inter}]")
    if flags.dtype != torch.int8 or flags.device != act.device:
        raise ValueError("flags must be int8 on act's device")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype {out_dtype} is not supported")
    check_index_range(w_down_t.shape[1], inter, B)
    cfg = down_config(B)
    acc, tickets = down_workspace(B, w_down_t.shape[1], inter, act.device, cfg)
    if acc is not None:
        acc.zero_()
        tickets.zero_()
    return launch_down(act, flags, w_down_t, out_dtype, acc, tickets, cfg)
