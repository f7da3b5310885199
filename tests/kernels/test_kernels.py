"""The decode kernels one by one: fused gate, fused gate + up, sparse down, fused up + down."""

import pytest
import torch
from problems import make_problem, poison_allocator
from tolerances import TOLERANCES

from cats_serve.kernels import (
    active_counts_reference,
    cats_gate,
    cats_mlp_reference,
    down_reference,
    gate_reference,
    gate_up_reference,
)
from cats_serve.kernels.baselines.down import cats_down
from cats_serve.kernels.baselines.gate_up import cats_gate_up
from cats_serve.kernels.gate import gate_config
from cats_serve.kernels.mlp import _sparse_decode
from cats_serve.kernels.updown import updown_config

HIDDEN, INTER = 72, 200


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate(device, dtype, batch, sparsity):
    p = make_problem(batch, HIDDEN, INTER, dtype, device, sparsity, seed=batch)
    counts = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    poison_allocator(device, batch * INTER + INTER)
    g_masked, flags = cats_gate(p.x, p.w_gate, p.threshold, active_count=counts)
    ref, active = gate_reference(p.x, p.w_gate, p.threshold)
    assert g_masked.shape == (batch, INTER) and g_masked.dtype == torch.float32
    assert torch.equal(flags.cpu().bool(), active.any(dim=0).cpu())
    assert torch.equal(counts.cpu(), active_counts_reference(active).cpu())
    assert torch.equal((g_masked != 0).cpu(), active.cpu())
    torch.testing.assert_close(g_masked, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_up(device, dtype, batch, sparsity):
    p = make_problem(batch, HIDDEN, INTER, dtype, device, sparsity, seed=batch + 1)
    poison_allocator(device, batch * INTER + INTER)
    act, flags = cats_gate_up(p.x, p.w_gate, p.w_up, p.threshold)
    ref, active, _ = gate_up_reference(p.x, p.w_gate, p.w_up, p.threshold)
    assert torch.equal(flags.cpu().bool(), active.any(dim=0).cpu())
    assert torch.equal(act[~active], torch.zeros_like(act[~active]))
    torch.testing.assert_close(act, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_down_reads_only_flagged_rows(device, dtype, batch):
    gen = torch.Generator().manual_seed(batch)
    act = torch.randn(batch, INTER, generator=gen)
    flags = (torch.rand(INTER, generator=gen) < 0.5).to(torch.int8)
    act[:, flags == 0] = 0.0
    w_down_t = torch.randn(INTER, HIDDEN, generator=gen).to(dtype)
    # Unflagged rows hold NaN: reading any of them would poison the output.
    w_down_t[flags == 0] = float("nan")
    act, flags, w_down_t = act.to(device), flags.to(device), w_down_t.to(device)
    poison_allocator(device, batch * HIDDEN + 64)
    out = cats_down(act, flags, w_down_t, dtype)
    clean = torch.where(flags[:, None].bool(), w_down_t, torch.zeros_like(w_down_t))
    ref = down_reference(act, clean, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize(("batch", "sparsity"), [(1, 0.7), (3, 0.7), (3, 1.0)])
def test_fused_up_down_reads_only_listed_rows(device, batch, sparsity):
    # The sparse decode step: gate kernel with the packed active list, then fused up + down.
    # Rows of W_up and W_down^T outside the union hold NaN, and tiny tiles make the block scan
    # run in several chunks, programs span several gate blocks and the final cast loop.
    p = make_problem(batch, HIDDEN, INTER, torch.float32, device, sparsity, seed=batch + 20)
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    _, active = gate_reference(p.x, p.w_gate, p.threshold)
    off = ~active.any(dim=0)
    w_up, w_down_t = p.w_up.clone(), p.w_down_t.clone()
    w_up[off] = float("nan")
    w_down_t[off] = float("nan")
    cfgs = (
        gate_config(batch),
        dict(updown_config(batch), BLOCK_K=8, SCAN_BLOCK=2, CAST_BLOCK=32),
    )
    counts = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    poison_allocator(device, 4 * batch * (HIDDEN + INTER) + 4096)
    out = _sparse_decode(p.x, p.w_gate, w_up, w_down_t, p.threshold, counts, configs=cfgs)
    assert torch.isfinite(out).all()
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_float32_up_down_chunks_stay_at_eight_rows():
    """Compiled with 16-row chunks, the up+down kernel's float32 output was off by ~7e-4 of its
    largest value on the GPU (exact with 8): float32 keeps 8, half precision 16."""
    assert updown_config(19, torch.float32)["BLOCK_B"] == 8
    assert updown_config(19, torch.bfloat16)["BLOCK_B"] == 16
    assert updown_config(3, torch.float32)["BLOCK_B"] == 4
