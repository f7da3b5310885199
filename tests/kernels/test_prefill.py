"""cats_mlp_prefill: dense GEMMs with the per-token threshold applied."""

import pytest
import torch
from problems import make_problem
from tolerances import TOLERANCES

from cats_serve.kernels import cats_mlp_prefill, cats_mlp_reference


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_matches_reference(device, dtype, tokens, sparsity):
    p = make_problem(tokens, 72, 200, dtype, device, sparsity, seed=tokens)
    total = torch.full((1,), 5, dtype=torch.int32, device=device)  # counts are added
    out = cats_mlp_prefill(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, active_count=total)
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert out.shape == (tokens, 72) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert total.item() == 5 + ref_counts[:-1].sum().item()
    if sparsity == 1.0:
        assert torch.equal(out, torch.zeros_like(out))
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)
