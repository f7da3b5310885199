"""The criterion's per-neuron weights (neuron_scale s): neuron i is active for row b iff
|SiLU(gate(x_b))_i| * s_i > t_b. Every kernel and entry point against the float32 references
given the same s; thresholds lie in wide gaps of the scaled scores, so counts compare exactly."""

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem, make_scaled_problem, poison_allocator
from tolerances import TOLERANCES

from cats_serve.kernels import (
    active_counts_reference,
    cats_activation_torch,
    cats_gate,
    cats_mlp_decode,
    cats_mlp_gather,
    cats_mlp_prefill,
    cats_mlp_reference,
    gate_reference,
    gate_up_reference,
)
from cats_serve.kernels.activation import launch_cats_activation
from cats_serve.kernels.baselines.gate_up import cats_gate_up

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPARSITIES = [0.0, 0.5, 1.0]
# Odd sizes: neither is a power of two or a multiple of any block size.
SHAPES = [(72, 200), (100, 333)]
# Small batches on the first shape, three rows on the second.
BATCH_SHAPES = [(1, SHAPES[0]), (3, SHAPES[1])]
ENTRIES = ["sparse", "dense", "prefill", "gather"]


def zeros_i32(n, device):
    return torch.zeros(n, dtype=torch.int32, device=device)


def run_entry(entry, p, scale, x=None, threshold=None):
    """out and counts of one entry point: [B + 1] per row + union, or [1] total for prefill."""
    x = p.x if x is None else x
    threshold = p.threshold if threshold is None else threshold
    args = (x, p.w_gate, p.w_up, p.w_down_t, threshold)
    B, H = x.shape
    if entry == "prefill":
        counts = zeros_i32(1, x.device)
        out = cats_mlp_prefill(*args, active_count=counts, neuron_scale=scale)
        return out, counts
    counts = zeros_i32(B + 1, x.device)
    if entry == "gather":
        return cats_mlp_gather(*args, counts, neuron_scale=scale), counts
    poison_allocator(x.device.type, 4 * B * (H + p.w_gate.shape[0]) + 4096)
    out = cats_mlp_decode(*args, active_count=counts, path=entry, neuron_scale=scale)
    return out, counts


def check_against_reference(entry, p, scale, out, counts, tol):
    ref, ref_counts, _ = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, neuron_scale=scale
    )
    assert out.shape == p.x.shape and out.dtype == p.x.dtype and out.device == p.x.device
    assert torch.isfinite(out).all(), "an output element was not written"
    if entry == "prefill":
        assert counts.item() == ref_counts[:-1].sum().item()
    else:
        assert torch.equal(counts.cpu(), ref_counts.cpu())
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)
    return ref_counts


# 1. The fused gate kernels.


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gate_with_scale(device, shape, dtype, batch, sparsity):
    hidden, inter = shape
    p, s = make_scaled_problem(batch, hidden, inter, dtype, device, sparsity, seed=batch + 30)
    counts = zeros_i32(batch + 1, device)
    poison_allocator(device, batch * inter + inter)
    g_masked, flags = cats_gate(p.x, p.w_gate, p.threshold, active_count=counts, neuron_scale=s)
    ref, active = gate_reference(p.x, p.w_gate, p.threshold, neuron_scale=s)
    assert g_masked.shape == (batch, inter) and g_masked.dtype == torch.float32
    assert torch.equal((g_masked != 0).cpu(), active.cpu())
    assert torch.equal(flags.cpu().bool(), active.any(dim=0).cpu())
    assert torch.equal(counts.cpu(), active_counts_reference(active).cpu())
    if sparsity == 0.0:
        assert counts[-1].item() == inter
    if sparsity == 1.0:
        assert torch.equal(counts.cpu(), torch.zeros(batch + 1, dtype=torch.int32))
    torch.testing.assert_close(g_masked, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize(("batch", "shape"), BATCH_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_up_with_scale(device, dtype, batch, shape, sparsity):
    hidden, inter = shape
    p, s = make_scaled_problem(batch, hidden, inter, dtype, device, sparsity, seed=batch + 40)
    counts = zeros_i32(batch + 1, device)
    poison_allocator(device, batch * inter + inter)
    act, flags = cats_gate_up(
        p.x, p.w_gate, p.w_up, p.threshold, active_count=counts, neuron_scale=s
    )
    ref, active, _ = gate_up_reference(p.x, p.w_gate, p.w_up, p.threshold, neuron_scale=s)
    assert torch.equal(flags.cpu().bool(), active.any(dim=0).cpu())
    assert torch.equal(counts.cpu(), active_counts_reference(active).cpu())
    assert torch.equal(act[~active], torch.zeros_like(act[~active]))
    torch.testing.assert_close(act, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("union", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_kernel_with_scale(device, dtype, union):
    # The dense path's kernel, from the same GEMM outputs as its torch twin.
    p, s = make_scaled_problem(5, *SHAPES[1], dtype, device, 0.5, seed=50)
    gate_lin, up_lin = F.linear(p.x, p.w_gate), F.linear(p.x, p.w_up)
    counts = zeros_i32(6 if union else 1, device)
    act = launch_cats_activation(gate_lin, up_lin, p.threshold, counts, union, neuron_scale=s)
    ref, active, _ = cats_activation_torch(gate_lin, up_lin, p.threshold, neuron_scale=s)
    ref_counts = active_counts_reference(active)
    expected = ref_counts if union else ref_counts[:-1].sum(dtype=torch.int32).reshape(1)
    assert act.dtype == dtype
    assert torch.equal(counts.cpu(), expected.cpu())
    assert torch.equal((act != 0).cpu(), active.cpu())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(act, ref, atol=tol.atol, rtol=tol.rtol)


# 2. The scale changes the mask; a uniform scale is the same as a divided threshold.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_changes_the_mask(device, dtype):
    p, s = make_scaled_problem(3, *SHAPES[1], dtype, device, 0.5, seed=60)
    scaled, _ = cats_gate(p.x, p.w_gate, p.threshold, neuron_scale=s)
    plain, _ = cats_gate(p.x, p.w_gate, p.threshold)
    on_scaled, on_plain = (scaled != 0).cpu(), (plain != 0).cpu()
    gained, lost = on_scaled & ~on_plain, on_plain & ~on_scaled
    # Same g, same t: a neuron turns on only through a weight > 1 and off only through one < 1.
    assert gained.any() and lost.any()
    s_rows = s.cpu().expand_as(gained)
    assert (s_rows[gained] > 1).all() and (s_rows[lost] < 1).all()
    _, ref_scaled = gate_reference(p.x, p.w_gate, p.threshold, neuron_scale=s)
    _, ref_plain = gate_reference(p.x, p.w_gate, p.threshold)
    assert not torch.equal(ref_scaled, ref_plain)
    assert torch.equal(on_scaled, ref_scaled.cpu())


@pytest.mark.parametrize(
    ("dtype", "c"), [(torch.float32, 1.0), (torch.bfloat16, 4.0), (torch.float32, 0.25)]
)
def test_uniform_scale_is_a_divided_threshold(device, dtype, c):
    # |g| * c > t  <=>  |g| > t / c exactly for a power of two c, so the kernels must give
    # bit-identical results; c = 1 is the all-ones scale against neuron_scale=None.
    p = make_problem(3, *SHAPES[0], dtype, device, 0.5, seed=70)
    inter = p.w_gate.shape[0]
    ones = torch.full((inter,), c, dtype=torch.float32, device=device)
    t_div = p.threshold / c
    c_scaled, c_plain = zeros_i32(4, device), zeros_i32(4, device)
    g_s, f_s = cats_gate(p.x, p.w_gate, p.threshold, active_count=c_scaled, neuron_scale=ones)
    g_p, f_p = cats_gate(p.x, p.w_gate, t_div, active_count=c_plain)
    assert torch.equal(g_s, g_p) and torch.equal(f_s, f_p) and torch.equal(c_scaled, c_plain)
    assert 0 < c_plain[-1].item() < inter
    a_s, f_s = cats_gate_up(p.x, p.w_gate, p.w_up, p.threshold, neuron_scale=ones)
    a_p, f_p = cats_gate_up(p.x, p.w_gate, p.w_up, t_div)
    assert torch.equal(a_s, a_p) and torch.equal(f_s, f_p)
    for entry in ENTRIES:
        out_s, counts_s = run_entry(entry, p, ones)
        out_p, counts_p = run_entry(entry, p, None, threshold=t_div)
        assert torch.equal(counts_s.cpu(), counts_p.cpu()), entry
        torch.testing.assert_close(out_s, out_p, atol=1e-6, rtol=1e-6, msg=entry)


# 3. The MLP entry points.


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize(("batch", "shape"), BATCH_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_with_scale(device, dtype, batch, shape, sparsity, path):
    p, s = make_scaled_problem(batch, *shape, dtype, device, sparsity, seed=batch + 80)
    out, counts = run_entry(path, p, s)
    check_against_reference(path, p, s, out, counts, TOLERANCES[dtype])
    if sparsity == 1.0:
        assert torch.equal(counts.cpu(), torch.zeros(batch + 1, dtype=torch.int32))
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_with_scale_large_batch(device, shape, path):
    # 19 rows exceed the kernels' largest row chunk (16): the scale is reused across chunks.
    p, s = make_scaled_problem(19, *shape, torch.bfloat16, device, 0.5, seed=90)
    out, counts = run_entry(path, p, s)
    check_against_reference(path, p, s, out, counts, TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_with_scale(device, dtype, tokens, sparsity):
    shape = SHAPES[tokens % 2]
    p, s = make_scaled_problem(tokens, *shape, dtype, device, sparsity, seed=tokens + 100)
    out, counts = run_entry("prefill", p, s)
    check_against_reference("prefill", p, s, out, counts, TOLERANCES[dtype])
    if sparsity == 1.0:
        assert counts.item() == 0 and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize(("batch", "shape"), BATCH_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_with_scale(device, dtype, batch, shape, sparsity):
    p, s = make_scaled_problem(batch, *shape, dtype, device, sparsity, seed=batch + 110)
    out, counts = run_entry("gather", p, s)
    check_against_reference("gather", p, s, out, counts, TOLERANCES[dtype])
    if sparsity == 1.0:
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback is for CPU-only hosts")
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_cpu_fallback_with_scale(monkeypatch, path):
    # Without the interpreter, CPU tensors take the torch paths (gather, cats_mlp_torch).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p, s = make_scaled_problem(3, *SHAPES[1], torch.bfloat16, "cpu", 0.5, seed=120)
    out, counts = run_entry(path, p, s)
    check_against_reference(path, p, s, out, counts, TOLERANCES[torch.bfloat16])


# 4. Per-row thresholds with one shared per-neuron scale.


@pytest.mark.parametrize("entry", ENTRIES)
def test_rows_keep_their_thresholds_under_a_shared_scale(device, entry):
    # Rows aim at sparsities 0.5, 0.3, 0.7 of the scaled scores; the last row has none active.
    p, s = make_scaled_problem(4, *SHAPES[1], torch.float32, device, 0.5, seed=130)
    inter = p.w_gate.shape[0]
    p.threshold[3] = 1e6
    out, counts = run_entry(entry, p, s)
    ref_counts = check_against_reference(entry, p, s, out, counts, TOLERANCES[torch.float32])
    rows = ref_counts[:4].tolist()
    assert len(set(rows[:3])) == 3 and all(0 < n < inter for n in rows[:3]) and rows[3] == 0
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    solo_total = 0
    for b in range(4):
        solo, solo_counts = run_entry(entry, p, s, p.x[b : b + 1], p.threshold[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], solo, atol=1e-4, rtol=1e-4)
        if entry == "prefill":
            solo_total += solo_counts.item()
        else:
            assert solo_counts.tolist() == [rows[b], rows[b]]
            assert counts[b].item() == rows[b]
    if entry == "prefill":
        assert counts.item() == solo_total == sum(rows)


# 5. Validation.

BAD_SCALES = {
    "short": lambda s: s[:-1],
    "long": lambda s: torch.cat([s, s[:1]]),
    "float64": lambda s: s.double(),
    "bfloat16": lambda s: s.bfloat16(),
    "row": lambda s: s[None, :],
    "column": lambda s: s[:, None],
    "strided": lambda s: torch.stack([s, s], dim=1)[:, 0],
    "list": lambda s: s.tolist(),
    "meta device": lambda s: torch.empty_like(s, device="meta"),
}


def call_entry(entry, p, scale):
    args = (p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    if entry == "gate":
        return cats_gate(p.x, p.w_gate, p.threshold, neuron_scale=scale)
    if entry == "gate_up":
        return cats_gate_up(p.x, p.w_gate, p.w_up, p.threshold, neuron_scale=scale)
    if entry == "prefill":
        return cats_mlp_prefill(*args, neuron_scale=scale)
    return cats_mlp_decode(*args, path=entry, neuron_scale=scale)


VALIDATED = ["sparse", "dense", "auto", "prefill", "gate", "gate_up"]


@pytest.fixture
def scaled(device):
    return make_scaled_problem(2, *SHAPES[0], torch.float32, device, 0.5, seed=140)


@pytest.mark.parametrize("bad", sorted(BAD_SCALES))
@pytest.mark.parametrize("entry", VALIDATED)
def test_rejects_bad_scale(scaled, entry, bad):
    p, s = scaled
    bad_scale = BAD_SCALES[bad](s)
    if bad == "strided":
        assert bad_scale.shape == s.shape and not bad_scale.is_contiguous()
    with pytest.raises(ValueError, match="neuron_scale"):
        call_entry(entry, p, bad_scale)


@pytest.mark.parametrize("entry", VALIDATED)
def test_accepts_a_valid_scale(scaled, entry):
    # The control for the rejections: the same call with the good scale goes through.
    p, s = scaled
    result = call_entry(entry, p, s)
    out = result[0] if isinstance(result, tuple) else result
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("entry", VALIDATED)
def test_rejects_scale_on_another_device(scaled, entry):
    p, s = scaled
    if p.x.device.type == "cuda":
        other = "cpu"
    elif torch.cuda.is_available():
        other = "cuda"
    else:
        pytest.skip("no second real device")
    with pytest.raises(ValueError, match="neuron_scale"):
        call_entry(entry, p, s.to(other))
