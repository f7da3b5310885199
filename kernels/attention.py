"""Decode attention over a static KV cache that reads only each row's own positions.

Under CUDA graphs a decode step is captured once for the whole cache length (`kv_len` = the
cache's S), so attention written as matmuls over `cache[:, :, :kv_len]` with a mask reads every
slot's full cache on every step, however short its context: at the server's default 2048
positions that is the size of a weight matrix per layer and row. Here the loop bounds come
from `positions` on the device, so a row reads positions 0..positions[b] and nothing more.

One launch (split-KV, "flash-decoding"):
1. grid (B, nkv, splits): program (b, h, s) takes the query heads of KV head h (its GQA group,
   padded to a tile of >= 16 rows for tl.dot) and the s-th of `splits` equal shares of row
   b's own context (positions[b] + 1 positions, shares rounded up to whole blocks of
   BLOCK_N), streams those K/V positions with an online softmax (float32), and writes its
   running max, its sum of exponentials and its unnormalised output. A split with nothing
   left to read (a context shorter than splits blocks) writes max = -inf, sum = 0.
   Both products take float32 operands: with TF32 inputs every fp16/bf16 value is exact, so
   it equals a half-precision MMA with float32 accumulation (and the probabilities keep 10
   mantissa bits); float32 caches use IEEE products. (Half-precision tl.dot is also wrong
   under Triton 3.9's interpreter, which the CPU tests run on.)
2. the last split of each (row, KV head) to finish (a ticket per pair, taken after its own
   partial results are stored) merges the splits of the group's heads, rescaling each by
   exp(max_s - max), writes the output and puts the ticket back to 0, so one launch does both
   and the tickets (`attention_tickets`, zeroed once) serve the next call as they are.
The split count depends only on (B, nkv, kv_len), so it is fixed within a captured graph; it
gives short batches enough programs to use the whole GPU at long contexts. The shares are cut
on the device from each row's length, so a short context in a long cache still spreads over
every split.

`decode_attention_rope` takes the QKV projection's output instead of rotated queries: the
split kernel applies RoPE (rotate-half, HF Llama convention) to the queries and the new key
as it loads them, and writes the new key and value into the cache itself (split 0 of each row
and KV head), which saves the decode step two small kernels a layer (the rotation and the cache
write). Every split also uses the new key and value from registers at the row's own position,
so no program depends on another's cache write.
"""

import torch
import triton
import triton.language as tl

from .reference import apply_rope, decode_attention_reference
from .runtime import on_tensor_device, triton_available_for
from .validate import SUPPORTED_DTYPES

BLOCK_N = 64  # cache positions per inner step
TARGET_PROGRAMS = 264  # split work until (B * nkv * splits) reaches ~2 programs per H200 SM


@triton.jit
def _rotated(ptr, rows, rd, mask, cos, sin, half, ROPE: tl.constexpr):
    """Rows of head vectors at ptr + rows[:, None] + rd[None, :], rotate-half RoPE applied
    with ROPE (column d pairs with d +- half), rounded to the tensor's dtype, as float32."""
    x = tl.load(ptr + rows[:, None] + rd[None, :], mask=mask, other=0.0)
    if ROPE:
        first = rd < half
        partner = tl.where(first, rd + half, rd - half)
        other = tl.load(ptr + rows[:, None] + partner[None, :], mask=mask, other=0.0)
        sign = tl.where(first, -1.0, 1.0)
        rot = x.to(tl.float32) * cos[None, :] + sign[None, :] * other.to(tl.float32) * sin[None, :]
        x = rot.to(ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,  # [B, nh, D]; with ROPE the QKV output [B, (nh + 2 nkv) * D]
    k_ptr,  # [slots, nkv, S, D] (last dim contiguous)
    v_ptr,  # [slots, nkv, S, D] (last dim contiguous)
    pos_ptr,  # [B] int: row b attends to positions 0..pos[b]
    cos_ptr,  # [B, D / 2] float32 (read with ROPE)
    sin_ptr,  # [B, D / 2] float32 (read with ROPE)
    m_ptr,  # [B, nh, splits] float32 running max of the scores
    l_ptr,  # [B, nh, splits] float32 sum of exp(score - max)
    acc_ptr,  # [B, nh, splits, D] float32 sum of exp(score - max) * V
    tickets_ptr,  # [>= B * nkv] int32, 0 before and after the launch
    out_ptr,  # [B, nh * D] output, q's dtype
    sm_scale,
    num_heads, num_kv_heads, head_dim, kv_len, num_splits,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    pos = tl.load(pos_ptr + b).to(tl.int32)
    length = tl.minimum(pos + 1, kv_len)
    split_len = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = sp * split_len
    end = tl.minimum(start + split_len, length)

    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    g_ok = rg < GROUP
    d_ok = rd < head_dim
    heads = kvh * GROUP + rg
    half = head_dim // 2
    cos = tl.zeros([BLOCK_D], dtype=tl.float32)
    sin = tl.zeros([BLOCK_D], dtype=tl.float32)
    if ROPE:
        cos = tl.load(cos_ptr + b * half + rd % half, mask=d_ok, other=0.0)
        sin = tl.load(sin_ptr + b * half + rd % half, mask=d_ok, other=0.0)
    row_len = (num_heads + 2 * num_kv_heads) * head_dim if ROPE else num_heads * head_dim
    q_rows = b * row_len + heads * head_dim
    q = _rotated(q_ptr, q_rows, rd, g_ok[:, None] & d_ok[None, :], cos, sin, half, ROPE)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    if ROPE:  # this step's key and value: rotated, rounded to the cache's dtype
        one = tl.arange(0, 1)
        k_row = b * row_len + (num_heads + kvh) * head_dim + one
        v_row = k_row + num_kv_heads * head_dim
        k_new = _rotated(q_ptr, k_row, rd, d_ok[None, :], cos, sin, half, ROPE)
        k_new = k_new.to(k_ptr.dtype.element_ty)
        v_new = tl.load(q_ptr + v_row[:, None] + rd[None, :], mask=d_ok[None, :], other=0.0)
        v_new = v_new.to(v_ptr.dtype.element_ty)
        if sp == 0:
            tl.store(k_base + pos * stride_ks + rd[None, :], k_new, mask=d_ok[None, :])
            tl.store(v_base + pos * stride_vs + rd[None, :], v_new, mask=d_ok[None, :])
        k_new = k_new.to(tl.float32)
        v_new = v_new.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rn[:, None] * stride_ks + rd[None, :], mask=kv_mask, other=0.0)
        k = k.to(tl.float32)
        if ROPE:  # the row's own position: the new key from registers, not the cache
            k = tl.where((rn == pos)[:, None], k_new, k)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rn[:, None] * stride_vs + rd[None, :], mask=kv_mask, other=0.0)
        v = v.to(tl.float32)
        if ROPE:
            v = tl.where((rn == pos)[:, None], v_new, v)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    gd_ok = g_ok[:, None] & d_ok[None, :]
    out_rows = (b * num_heads + heads)[:, None] * head_dim + rd[None, :]
    if num_splits == 1:
        tl.store(out_ptr + out_rows, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_ok)
    else:
        first = (b * num_heads + heads) * num_splits  # [BLOCK_G]
        tl.store(m_ptr + first + sp, m_i, mask=g_ok)
        tl.store(l_ptr + first + sp, l_i, mask=g_ok)
        tl.store(acc_ptr + (first + sp)[:, None] * head_dim + rd[None, :], acc, mask=gd_ok)
        # All threads' stores are issued before the ticket; the acq_rel ticket orders them
        # before the last program's reads (which bypass L1 with .cg).
        tl.debug_barrier()
        ticket = tickets_ptr + b * num_kv_heads + kvh
        if tl.atomic_add(ticket, 1, sem="acq_rel") == num_splits - 1:
            _merge(m_ptr, l_ptr, acc_ptr, out_ptr, first, out_rows, rd, g_ok, gd_ok, head_dim,
                   num_splits, BLOCK_G, BLOCK_D)  # fmt: skip
            tl.store(ticket, 0)


@triton.jit
def _merge(m_ptr, l_ptr, acc_ptr, out_ptr, first, out_rows, rd, g_ok, gd_ok, head_dim,
           num_splits, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """out = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp(m_s - max_s m_s), per head of the
    group (an empty split has m = -inf, so w = 0; split 0 is never empty)."""
    top = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m_s = tl.load(m_ptr + first + s, mask=g_ok, other=0.0, cache_modifier=".cg")
        top = tl.maximum(top, m_s)
    den = tl.zeros([BLOCK_G], dtype=tl.float32)
    num = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s in range(num_splits):
        w = tl.exp(tl.load(m_ptr + first + s, mask=g_ok, other=0.0, cache_modifier=".cg") - top)
        den += w * tl.load(l_ptr + first + s, mask=g_ok, other=0.0, cache_modifier=".cg")
        part = tl.load(acc_ptr + (first + s)[:, None] * head_dim + rd[None, :], mask=gd_ok,
                       other=0.0, cache_modifier=".cg")  # fmt: skip
        num += w[:, None] * part
    den = tl.where(g_ok, den, 1.0)
    tl.store(out_ptr + out_rows, (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=gd_ok)


def split_plan(batch: int, kv_heads: int, kv_len: int) -> int:
    """How many splits each (row, KV head) gets for a step over `kv_len` cache positions."""
    blocks = triton.cdiv(kv_len, BLOCK_N)
    return max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, batch * kv_heads)))


def _check_args(q, k_cache, v_cache, positions, kv_len, contiguous: bool = True) -> None:
    """q [B, nh, D] (contiguous unless told; the rope form passes a view into qkv)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or min(q.shape) < 1:
        raise ValueError("q must be a non-empty 3-D tensor [batch, heads, head_dim]")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if contiguous and not q.is_contiguous():
        raise ValueError("q must be contiguous")
    b, nh, d = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [slots, kv_heads, positions, head_dim]")
        if c.dtype != q.dtype or c.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device})")
        if c.shape[0] < b or c.shape[3] != d or c.stride(3) != 1:
            raise ValueError(
                f"{name} must hold >= {b} slots of head_dim {d} with a contiguous last dim, "
                f"got shape {list(c.shape)}"
            )
        if c.shape[:3] != k_cache.shape[:3] or nh % c.shape[1] != 0:
            raise ValueError(
                f"k_cache and v_cache must share a shape whose kv_heads divides the {nh} heads"
            )
    if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (b,):
        raise ValueError(f"positions must be a tensor of shape [{b}]")
    if positions.dtype not in (torch.int32, torch.int64) or positions.device != q.device:
        raise ValueError(f"positions must be int32 or int64 on {q.device}")
    if not 1 <= kv_len <= k_cache.shape[2]:
        raise ValueError(f"kv_len must be in [1, {k_cache.shape[2]}], got {kv_len}")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    kv_len: int,
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per row: out [B, nh * D] in q.dtype.

    q [B, nh, D] contiguous (RoPE applied); k_cache, v_cache [slots, nkv, S, D] of q's dtype,
    row b reading slot b, with its new K/V already written at positions[b]; positions [B]
    int32/int64 on q's device; kv_len <= S, the cache positions a step may touch (static under
    CUDA graphs). Row b attends to positions 0..min(positions[b], kv_len - 1). Triton kernels
    where they can run (CUDA, or the CPU interpreter), else `decode_attention_reference` in
    q's dtype. tickets: optional `attention_tickets` of the cache (else made for the call).
    """
    _check_args(q, k_cache, v_cache, positions, kv_len)
    if not triton_available_for(q.device):
        return decode_attention_reference(q, k_cache, v_cache, positions, kv_len, q.dtype)
    _check_tickets(tickets, k_cache)
    return _launch(q, k_cache, v_cache, positions, kv_len, tickets)


def decode_attention_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    kv_len: int,
    num_heads: int,
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE, the cache write and attention of one new token per row: out [B, nh * D].

    qkv [B, (nh + 2 nkv) * D] contiguous: the QKV projection's output, queries then keys then
    values, none rotated; cos, sin [B, D / 2] float32, the rotation at positions[b]. The new
    key (rotated) and value are written into the caches at (slot b, positions[b]) (so
    positions[b] < S), then row b attends as in `decode_attention`. Triton where it can run,
    else the same steps in torch ops. tickets: as for `decode_attention`.
    """
    b = qkv.shape[0] if isinstance(qkv, torch.Tensor) and qkv.dim() == 2 else -1
    nkv = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else 0
    d = k_cache.shape[3] if nkv else 0
    if b < 1 or not nkv or qkv.shape[1] != (num_heads + 2 * nkv) * d or not qkv.is_contiguous():
        raise ValueError(
            f"qkv must be a contiguous [batch, (heads + 2 kv_heads) * head_dim] tensor "
            f"({num_heads} heads, {nkv} kv heads of {d}), got "
            f"{list(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}"
        )
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (b, d // 2) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [{b}, {d // 2}] tensor")
    q = qkv[:, : num_heads * d].view(b, num_heads, d)
    _check_args(q, k_cache, v_cache, positions, kv_len, contiguous=False)
    if positions.device.type == "cpu" and bool((positions >= k_cache.shape[2]).any()):
        # (on a GPU this check would wait for the device; the server keeps positions < S)
        raise ValueError(f"positions must be < the cache's {k_cache.shape[2]} positions")
    if not triton_available_for(qkv.device):  # queries and keys rotated in one go
        qk = qkv[:, : (num_heads + nkv) * d].view(b, num_heads + nkv, d)
        q, k = apply_rope(qk, cos[:, None], sin[:, None]).split([num_heads, nkv], dim=1)
        slots = torch.arange(b, device=qkv.device)
        k_cache[slots, :, positions] = k
        v_cache[slots, :, positions] = qkv[:, (num_heads + nkv) * d :].view(b, nkv, d)
        return decode_attention_reference(q, k_cache, v_cache, positions, kv_len, q.dtype)
    _check_tickets(tickets, k_cache)
    return _launch(qkv, k_cache, v_cache, positions, kv_len, tickets, (cos, sin, num_heads))


def attention_tickets(k_cache: torch.Tensor) -> torch.Tensor:
    """The split kernel's tickets for a cache [slots, nkv, S, D]: int32 zeros, one per (slot,
    KV head), left zeroed by every launch, so one set serves every layer and step (make it
    before a CUDA graph is captured)."""
    return torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.int32,
                       device=k_cache.device)  # fmt: skip


def _check_tickets(tickets, k_cache) -> None:
    n = k_cache.shape[0] * k_cache.shape[1]
    if tickets is not None and (
        tickets.dtype != torch.int32 or tickets.device != k_cache.device or tickets.numel() < n
    ):
        raise ValueError(f"tickets must be int32 with >= {n} elements on {k_cache.device}")


@on_tensor_device
def _launch(q, k_cache, v_cache, positions, kv_len: int, tickets, rope=None) -> torch.Tensor:
    """The kernel on validated arguments; rope: None (q [B, nh, D] rotated), or (cos, sin, nh)
    with q the QKV output [B, (nh + 2 nkv) * D]; tickets None: zeros made here."""
    nkv, d = k_cache.shape[1], k_cache.shape[3]
    b = q.shape[0]
    nh = q.shape[1] if rope is None else rope[2]
    cos, sin = (positions, positions) if rope is None else rope[:2]
    group = nh // nkv
    splits = split_plan(b, nkv, kv_len)
    m = torch.empty(b, nh, splits, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty(b, nh, splits, d, dtype=torch.float32, device=q.device)
    if tickets is None:
        tickets = attention_tickets(k_cache)
    out = torch.empty(b, nh * d, dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    _decode_attention_split_kernel[(b, nkv, splits)](
        q, k_cache, v_cache, positions, cos, sin, m, lse, acc, tickets, out, d**-0.5,
        nh, nkv, d, kv_len, splits,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        BLOCK_D=block_d, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROPE=rope is not None, num_warps=4,
    )  # fmt: skip
    return out
