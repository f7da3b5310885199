"""Dense int8-weight GEMV / small-batch GEMM: out [B, N] = (x [B, K] @ q^T) * s, in x.dtype.

q is read as int8 and widened in registers (widen.py: exact, without the GPU's slow
integer-to-float conversion); the per-output-channel scale s multiplies each
finished sum, so the weight bytes read are one per element. Both storage layouts of
`Int8Matrix` go through the same kernel through strides (q [N, K]: stride_n = K, stride_k = 1;
q stored transposed [K, N]: stride_n = 1, stride_k = N).

Grid: (cdiv(N, BLOCK_N), SPLIT_K) programs, each owning BLOCK_N output channels, every row of
the batch (rows in chunks of BLOCK_B; a later chunk re-reads the program's weights, mostly from
L2) and one of SPLIT_K equal shares of K. Where cdiv(N, BLOCK_N) alone would leave the GPU
short of programs (the down projection's 4096 outputs in 128-wide column tiles are 32), K is
split and the shares' scaled partial sums are added into a zeroed float32 buffer with atomics
(then cast to the output dtype). Small batches accumulate a 3-D fp32 tile with FMAs and
reduce it once (like the gate kernel); from DOT_MIN_ROWS rows (DOT_MIN_ROWS_TRANSPOSED for the
transposed layout) the product goes to tensor
cores (`tl.dot`: compiled, fp16/bf16 activations meet the weight tile converted to their
dtype, exact for int8 values; fp32 activations use IEEE products; under Triton's interpreter,
whose half-precision tl.dot is wrong, float32 operands with TF32 products, which hold every
int8 and fp16/bf16 value exactly).
"""

import torch
import triton
import triton.language as tl

from .int8 import Int8Matrix
from .runtime import interpreter_enabled, on_tensor_device
from .widen import int8_to_bfloat16, int8_to_float32

# Rows from which tensor cores beat the FMA tile (an H100, Llama-2-7B shapes: at 3 rows the dot
# path took 13-62 us against 14-93 us; at 2 rows it tied the transposed W_down's FMA tile and
# lost elsewhere; results/int8_gemv_sweep_h100.json)
DOT_MIN_ROWS, DOT_MIN_ROWS_TRANSPOSED = 3, 2


def uses_dot(rows: int, transposed: bool) -> bool:
    """Whether `rows` rows of a product in this layout go through tl.dot."""
    return rows >= (DOT_MIN_ROWS_TRANSPOSED if transposed else DOT_MIN_ROWS)


@triton.jit
def _int8_gemv_kernel(
    x_ptr,  # [B, K] activations
    q_ptr,  # int8 weight, element (n, k) at n * stride_n + k * stride_k
    s_ptr,  # [N] float32 scales
    out_ptr,  # [B, N]: x.dtype, or a zeroed float32 buffer added into (SPLIT_K > 1)
    B, N, K, stride_n, stride_k, k_share,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, TRANSPOSED: tl.constexpr, HALF_DOT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    k_lo = tl.program_id(1) * k_share  # this program's share of K: [k_lo, k_hi)
    k_hi = tl.minimum(k_lo + k_share, K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    rk0 = tl.arange(0, BLOCK_K)
    rb0 = tl.arange(0, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + rb0
        b_ok = rb < B
        if USE_DOT:
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        elif TRANSPOSED:
            acc3 = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_N], dtype=tl.float32)
        else:
            acc3 = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            rk = k0 + rk0
            k_ok = rk < k_hi
            xv = tl.load(
                x_ptr + rb[:, None] * K + rk[None, :],
                mask=b_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if USE_DOT:
                w = tl.load(
                    q_ptr + rk[:, None] * stride_k + rn[None, :] * stride_n,
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0,
                )  # [BLOCK_K, BLOCK_N]
                if HALF_DOT:  # compiled: an fp16/bf16 MMA (int8 values are exact in either)
                    if xv.dtype == tl.bfloat16:
                        wh = int8_to_bfloat16(w)
                    else:
                        wh = int8_to_float32(w).to(xv.dtype)
                    acc = tl.dot(xv, wh, acc)
                else:
                    acc = tl.dot(
                        xv.to(tl.float32), int8_to_float32(w), acc, input_precision=PRECISION
                    )
            elif TRANSPOSED:  # rows of q are inputs: the tile's last axis is contiguous
                w = tl.load(
                    q_ptr + rk[:, None] * stride_k + rn[None, :],
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0,
                )  # [BLOCK_K, BLOCK_N]
                acc3 += xv.to(tl.float32)[:, :, None] * int8_to_float32(w)[None, :, :]
            else:
                w = tl.load(
                    q_ptr + rn[:, None] * stride_n + rk[None, :] * stride_k,
                    mask=n_ok[:, None] & k_ok[None, :],
                    other=0,
                )  # [BLOCK_N, BLOCK_K]
                acc3 += xv.to(tl.float32)[:, None, :] * int8_to_float32(w)[None, :, :]
        if not USE_DOT:
            acc = tl.sum(acc3, axis=1 if TRANSPOSED else 2)
        y = acc * s[None, :]
        ptrs = out_ptr + rb[:, None] * N + rn[None, :]
        m = b_ok[:, None] & n_ok[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(ptrs, y, mask=m, sem="relaxed")
        else:
            tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=m)


def int8_gemv_config(rows: int, transposed: bool) -> dict:
    """Tiles. FMA path (one or two rows): a 3-D fp32 tile of BLOCK_B * BLOCK_N * BLOCK_K
    values (8192 untransposed, 4096 transposed), wide along the contiguous axis so that loads
    stay contiguous; chosen from `bench_mlp.py --sweep-int8` on an H100
    (results/int8_gemv_sweep_h100.json). Dot path: 16..64-row tiles."""
    if uses_dot(rows, transposed):
        block_b = min(max(triton.next_power_of_2(rows), 16), 64)
        if interpreter_enabled():
            return dict(BLOCK_B=block_b, BLOCK_N=32, BLOCK_K=32, NUM_STAGES=1, num_warps=4)
        return dict(BLOCK_B=block_b, BLOCK_N=64, BLOCK_K=128, NUM_STAGES=4, num_warps=4)
    block_b = triton.next_power_of_2(rows)
    if interpreter_enabled():
        return dict(BLOCK_B=block_b, BLOCK_N=16, BLOCK_K=32, NUM_STAGES=1, num_warps=4)
    if transposed:  # one row here
        return dict(BLOCK_B=1, BLOCK_N=256, BLOCK_K=16, NUM_STAGES=4, num_warps=4)
    if rows == 1:  # 8 outputs a program: W_o's 4096 need no split of K
        return dict(BLOCK_B=1, BLOCK_N=8, BLOCK_K=1024, NUM_STAGES=3, num_warps=4)
    return dict(BLOCK_B=block_b, BLOCK_N=16 // block_b, BLOCK_K=512, NUM_STAGES=3, num_warps=4)


def split_k(n_programs: int, k: int, block_k: int) -> int:
    """Shares of K: 1 when the output tiles alone give >= MIN_PROGRAMS programs, else enough
    for ~TARGET_PROGRAMS, each share at least two K blocks."""
    if n_programs >= MIN_PROGRAMS:
        return 1
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, n_programs), k // (2 * block_k)))


MIN_PROGRAMS, TARGET_PROGRAMS = 264, 528  # two and four per SM of an H200 (132 SMs)


@on_tensor_device
def launch_int8_gemv(x: torch.Tensor, m: Int8Matrix, config: dict | None = None) -> torch.Tensor:
    """out [B, N] in x.dtype for x [B, K] contiguous on m's device. config: tiles (and
    optionally USE_DOT) in place of int8_gemv_config's, for benchmarks."""
    B, K = x.shape
    N = m.out_features
    if m.in_features != K:
        raise ValueError(f"x has {K} columns, the int8 matrix takes {m.in_features} inputs")
    cfg = dict(config or int8_gemv_config(B, m.transposed))
    use_dot = cfg.pop("USE_DOT", uses_dot(B, m.transposed))
    stride_n, stride_k = (1, N) if m.transposed else (K, 1)
    n_programs = triton.cdiv(N, cfg["BLOCK_N"])
    split = cfg.pop("SPLIT_K", None) or split_k(n_programs, K, cfg["BLOCK_K"])
    share = triton.cdiv(triton.cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(K, share)
    if split > 1:
        out = torch.zeros((B, N), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((B, N), device=x.device, dtype=x.dtype)
    _int8_gemv_kernel[(n_programs, split)](
        x, m.q, m.scale, out, B, N, K, stride_n, stride_k, share,
        USE_DOT=use_dot, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SPLIT_K=split, TRANSPOSED=m.transposed,
        HALF_DOT=x.dtype != torch.float32 and not interpreter_enabled(), **cfg,
    )  # fmt: skip
    return out.to(x.dtype)
