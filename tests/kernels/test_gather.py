"""cats_mlp_gather, the CPU sparse decode path, against the float32 reference."""

import pytest
import torch
from problems import make_problem
from tolerances import TOLERANCES

from cats_serve.kernels import cats_mlp_decode, cats_mlp_gather, cats_mlp_reference

# Odd sizes, as for the Triton kernels.
SHAPES = [(72, 200), (40, 136)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_matches_reference(device, shape, dtype, batch, sparsity):
    hidden, inter = shape
    p = make_problem(batch, hidden, inter, dtype, device, sparsity, seed=batch + 11)
    counts = torch.zeros(batch + 1, dtype=torch.int32, device=p.x.device)
    out = cats_mlp_gather(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, counts)
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert out.shape == (batch, hidden) and out.dtype == dtype
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    if sparsity == 1.0:  # an empty union: nothing gathered, the output is exactly zero
        assert torch.equal(out, torch.zeros_like(out))
    else:
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


def test_rows_keep_their_thresholds_inside_the_union():
    # Row 0 dense-equivalent makes the union every neuron; row 1 must still drop its own
    # inactive neurons, not take row 0's.
    p = make_problem(2, *SHAPES[0], torch.float32, "cpu", 0.5, seed=5)
    p.threshold[0] = 0.0
    counts = torch.zeros(3, dtype=torch.int32)
    out = cats_mlp_gather(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, counts)
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert counts[2] == SHAPES[0][1] and 0 < counts[1] < SHAPES[0][1]
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_sparse_path_uses_gather_without_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # plain CPU: no Triton backend
    p = make_problem(3, *SHAPES[1], torch.float32, "cpu", 0.5, seed=9)
    counts = torch.zeros(4, dtype=torch.int32)
    out = cats_mlp_decode(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, active_count=counts, path="sparse"
    )
    expected = torch.zeros(4, dtype=torch.int32)
    gathered = cats_mlp_gather(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, expected)
    assert torch.equal(out, gathered) and torch.equal(counts, expected)


def test_scratch_serves_calls_inside_and_outside_inference_mode():
    p = make_problem(1, *SHAPES[0], torch.float32, "cpu", 0.5, seed=13)
    args = (p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    with torch.inference_mode():
        inside = cats_mlp_gather(*args)  # the first call makes the scratch buffers
    outside = cats_mlp_gather(*args)
    assert torch.equal(inside, outside)
