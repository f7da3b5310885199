"""cats_mlp_decode (sparse and dense paths) against the float32 reference."""

import pytest
import torch
from problems import make_problem, poison_allocator
from tolerances import TOLERANCES

from cats_serve.kernels import cats_mlp_decode, cats_mlp_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes: neither is a multiple of any block size, so every tail mask is exercised.
SHAPES = [(72, 200), (40, 136)]


def run_decode(p, path):
    B, H = p.x.shape
    counts = torch.zeros(B + 1, dtype=torch.int32, device=p.x.device)
    poison_allocator(p.x.device.type, 4 * B * (H + p.w_gate.shape[0]) + 4096)
    out = cats_mlp_decode(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, active_count=counts, path=path
    )
    return out, counts


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(device, dtype, batch, sparsity, path):
    hidden, inter = SHAPES[0]
    p = make_problem(batch, hidden, inter, dtype, device, sparsity, seed=batch)
    out, counts = run_decode(p, path)
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)

    assert out.shape == (batch, hidden) and out.dtype == dtype and out.device == p.x.device
    assert torch.isfinite(out).all(), "an output element was not written"
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    if sparsity == 1.0:
        assert torch.equal(counts.cpu(), torch.zeros(batch + 1, dtype=torch.int32))
        assert torch.equal(out, torch.zeros_like(out))
    else:
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("batch", [2, 19])
def test_decode_second_shape_and_large_batch(device, batch, path):
    # 19 rows exceed the largest row chunk of the kernels, so rows are processed in chunks.
    hidden, inter = SHAPES[1]
    dtype = torch.bfloat16
    p = make_problem(batch, hidden, inter, dtype, device, 0.5, seed=7)
    out, counts = run_decode(p, path)
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


def test_rows_have_their_own_thresholds(device):
    # Row 0 dense-equivalent, row 1 all inactive, row 2 about half: counts follow each row.
    hidden, inter = SHAPES[0]
    p = make_problem(3, hidden, inter, torch.float32, device, 0.5, seed=3)
    p.threshold[0] = 0.0
    p.threshold[1] = 1e6
    out, counts = run_decode(p, "sparse")
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert counts[0].item() == inter
    assert counts[1].item() == 0
    assert 0 < counts[2].item() < inter
    assert counts[3].item() == inter  # the union includes the dense row
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_counts_accumulate_across_calls(device, path):
    # The engine adds every layer's counts into one buffer and reads it once per step; a
    # second call must also be right (the split-K workspace and tickets are reset per call).
    hidden, inter = SHAPES[0]
    first = make_problem(2, hidden, inter, torch.float32, device, 0.5, seed=11)
    second = make_problem(2, hidden, inter, torch.float32, device, 0.7, seed=12)
    counts = torch.zeros(3, dtype=torch.int32, device=device)
    expected = torch.zeros(3, dtype=torch.int32)
    for p in (first, second):
        out = cats_mlp_decode(
            p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, active_count=counts, path=path
        )
        ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
        expected += ref_counts.cpu()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(counts.cpu(), expected)


def test_auto_path_and_no_counter(device):
    hidden, inter = SHAPES[0]
    p = make_problem(1, hidden, inter, torch.float32, device, 0.5, seed=5)
    ref, _, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    for hint in (None, 0.0, 0.99):
        out = cats_mlp_decode(
            p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, union_sparsity_hint=hint
        )
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback is for CPU-only hosts")
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_cpu_fallback_without_interpreter(monkeypatch, path):
    # A CPU server without TRITON_INTERPRET runs both paths as PyTorch ops.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, inter = SHAPES[0]
    p = make_problem(3, hidden, inter, torch.bfloat16, "cpu", 0.5, seed=9)
    out, counts = run_decode(p, path)
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert torch.equal(counts, ref_counts)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)
