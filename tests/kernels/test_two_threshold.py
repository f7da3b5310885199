"""Two-threshold mode (a second threshold on |a_i| for the W_down rows) on every MLP path,
against the float32 reference: outputs, counts of up and of down rows, mixed rows."""

import pytest
import torch
from problems import down_thresholds, make_problem, poison_allocator
from tolerances import TOLERANCES

from cats_serve.kernels import (
    cats_mlp_decode,
    cats_mlp_gather,
    cats_mlp_prefill,
    cats_mlp_reference,
    cats_mlp_torch,
)
from cats_serve.kernels.gate import gate_config
from cats_serve.kernels.mlp import _sparse_decode
from cats_serve.kernels.updown import updown_config

SHAPES = [(72, 200), (40, 136)]  # odd: no size is a multiple of a block
# per-row targets for the second threshold (fraction of a row's active neurons whose W_down
# row is also skipped); rows cycle through them, so a batch mixes both modes
MIXED = [0.4, 0.0, 0.7]


def problem(batch, shape, dtype, device, up_sparsity, down_targets, seed):
    p = make_problem(batch, *shape, dtype, device, up_sparsity, seed=seed)
    targets = [down_targets[b % len(down_targets)] for b in range(batch)]
    return p, down_thresholds(p, targets)


def decode(p, t_down, path):
    B, H = p.x.shape
    counts = torch.zeros(B + 1, dtype=torch.int32, device=p.x.device)
    down = torch.zeros(B + 1, dtype=torch.int32, device=p.x.device)
    poison_allocator(p.x.device.type, 4 * B * (H + p.w_gate.shape[0]) + 4096)
    out = cats_mlp_decode(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold,
        active_count=counts, path=path, down_threshold=t_down, down_count=down,
    )  # fmt: skip
    return out, counts, down


def check(out, ref, dtype):
    assert torch.isfinite(out).all(), "an output element was not written"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("batch", [1, 3, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_reference(device, shape, dtype, batch, path):
    p, t_down = problem(batch, shape, dtype, device, 0.3, MIXED, seed=batch)
    out, counts, down = decode(p, t_down, path)
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    assert torch.equal(counts.cpu(), ref_up.cpu())
    assert torch.equal(down.cpu(), ref_down.cpu())
    assert (ref_down[:-1] < ref_up[:-1]).any(), "the second threshold dropped no down row"
    check(out, ref, dtype)


@pytest.mark.parametrize("two_kernels", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("targets", [MIXED, [1.0]], ids=["mixed", "all-off"])
@pytest.mark.parametrize("batch", [1, 3, 19])
def test_both_sparse_forms_read_only_kept_rows(device, batch, targets, two_kernels):
    # W_up rows of neurons no row activates and W_down rows of neurons no row keeps hold NaN:
    # a form that loads one of them (rather than masking or skipping it) returns NaN.
    p, t_down = problem(batch, SHAPES[1], torch.float32, device, 0.3, targets, seed=batch + 50)
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    x, wg, wu = (t.double() for t in (p.x, p.w_gate, p.w_up))
    g = torch.nn.functional.silu(x @ wg.t())
    up_on = g.abs() > p.threshold.double()[:, None]
    kept = up_on & ((g * (x @ wu.t())).abs() > t_down.double()[:, None])
    w_up, w_down_t = p.w_up.clone(), p.w_down_t.clone()
    w_up[~up_on.any(dim=0)] = float("nan")
    w_down_t[~kept.any(dim=0)] = float("nan")
    cfgs = (gate_config(batch), dict(updown_config(batch, torch.float32), TWO_KERNELS=two_kernels))
    up = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    down = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    poison_allocator(device, 4 * batch * (p.x.shape[1] + p.w_gate.shape[0]) + 4096)
    out = _sparse_decode(
        p.x, p.w_gate, w_up, w_down_t, p.threshold, up, configs=cfgs,
        down_t=t_down, down_count=down,
    )  # fmt: skip
    assert torch.equal(up.cpu(), ref_up.cpu()) and torch.equal(down.cpu(), ref_down.cpu())
    if targets == [1.0]:
        assert int(down[-1]) == 0 and torch.equal(out, torch.zeros_like(out))
    else:
        assert (ref_down[:-1] < ref_up[:-1]).any(), "the second threshold dropped no down row"
        # at small batches some W_down rows are read by no row, so the NaN check bites
        assert batch > 3 or not kept.any(dim=0).all()
        check(out, ref, torch.float32)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_zero_down_threshold_is_single_threshold(device, path):
    p, t_down = problem(3, SHAPES[0], torch.float32, device, 0.5, [0.0], seed=5)
    assert torch.equal(t_down, torch.zeros_like(t_down))
    out, counts, down = decode(p, t_down, path)
    single, single_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert torch.equal(counts.cpu(), single_counts.cpu())
    assert torch.equal(down.cpu(), single_counts.cpu())  # every active row's down row is read
    check(out, single, torch.float32)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("up_sparsity, down_target", [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_everything_off_and_everything_on(device, path, up_sparsity, down_target):
    p, t_down = problem(4, SHAPES[1], torch.float32, device, up_sparsity, [down_target], seed=9)
    out, counts, down = decode(p, t_down, path)
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    assert torch.equal(counts.cpu(), ref_up.cpu()) and torch.equal(down.cpu(), ref_down.cpu())
    if up_sparsity == 1.0 or down_target == 1.0:  # no W_down row read: the output is zero
        assert int(down[-1]) == 0
        assert torch.equal(out, torch.zeros_like(out))
    else:
        assert int(down[-1]) == p.w_gate.shape[0]  # dense: every row read
        check(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
def test_gather_path(dtype, batch):
    # the CPU sparse path (torch ops), with no Triton involved
    p, t_down = problem(batch, SHAPES[0], dtype, "cpu", 0.3, MIXED, seed=batch + 20)
    up = torch.zeros(batch + 1, dtype=torch.int32)
    down = torch.zeros(batch + 1, dtype=torch.int32)
    out = cats_mlp_gather(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, up, None, t_down, down)
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    assert torch.equal(up, ref_up) and torch.equal(down, ref_down)
    check(out, ref, dtype)


def test_torch_fallback_masks():
    p, t_down = problem(6, SHAPES[1], torch.float32, "cpu", 0.5, MIXED, seed=3)
    out, active, down = cats_mlp_torch(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    assert (down <= active).all()
    assert torch.equal(down.sum(1, dtype=torch.int32), ref_down[:-1])
    assert torch.equal(active.sum(1, dtype=torch.int32), ref_up[:-1])
    check(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_applies_both_masks(device, dtype):
    p, t_down = problem(11, SHAPES[0], dtype, device, 0.5, MIXED, seed=13)
    up = torch.zeros(1, dtype=torch.int32, device=device)
    down = torch.zeros(1, dtype=torch.int32, device=device)
    out = cats_mlp_prefill(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold,
        active_count=up, down_threshold=t_down, down_count=down,
    )  # fmt: skip
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    assert int(up) == int(ref_up[:-1].sum()) and int(down) == int(ref_down[:-1].sum())
    check(out, ref, dtype)


def test_paths_agree_on_one_batch(device):
    # the served function must not depend on which path ran
    p, t_down = problem(2, SHAPES[0], torch.float32, device, 0.3, MIXED, seed=31)
    sparse, *_ = decode(p, t_down, "sparse")
    dense, *_ = decode(p, t_down, "dense")
    prefill = cats_mlp_prefill(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefill, dense, atol=1e-5, rtol=1e-5)


def test_down_count_needs_its_threshold(device):
    p = make_problem(2, *SHAPES[0], torch.float32, device, 0.5)
    counts = torch.zeros(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="down_count needs down_threshold"):
        cats_mlp_decode(
            p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold,
            active_count=counts, down_count=counts.clone(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="down_threshold must have shape"):
        cats_mlp_decode(
            p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold,
            down_threshold=torch.zeros(5, device=device),
        )  # fmt: skip


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_one_batch_mixes_dense_single_and_two_threshold_rows(device, path):
    p, t_down = problem(3, SHAPES[0], torch.float32, device, 0.5, [0.0, 0.0, 0.5], seed=41)
    p.threshold[0] = 0.0  # row 0 dense, row 1 single-threshold, row 2 two-threshold
    out, counts, down = decode(p, t_down, path)
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    assert torch.equal(counts.cpu(), ref_up.cpu()) and torch.equal(down.cpu(), ref_down.cpu())
    inter = p.w_gate.shape[0]
    assert int(down[0]) == inter and int(down[1]) == int(counts[1]) < inter
    assert int(down[2]) < int(counts[2])
    check(out, ref, torch.float32)
    for row in range(3):  # each row is what it would be alone
        alone, *_ = cats_mlp_reference(
            p.x[row : row + 1], p.w_gate, p.w_up, p.w_down_t, p.threshold[row : row + 1],
            down_threshold=t_down[row : row + 1],
        )  # fmt: skip
        check(out[row : row + 1], alone, torch.float32)
