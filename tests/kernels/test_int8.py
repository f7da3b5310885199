"""Int8 weights: the quantization format, the int8 GEMV, and every CATS MLP path over int8
weights against float32 references of the dequantized weights, on odd shapes."""

import pytest
import torch
from problems import down_thresholds, make_int8_problem, poison_allocator
from tolerances import TOLERANCES

from cats_serve.kernels import (
    cats_mlp_decode,
    cats_mlp_gather,
    cats_mlp_prefill,
    cats_mlp_reference,
    cats_mlp_torch,
)
from cats_serve.kernels import int8 as int8_module
from cats_serve.kernels.int8 import (
    Int8Matrix,
    int8_linear,
    int8_linear_reference,
    linear,
    quantize_int8,
)
from cats_serve.kernels.int8_gemv import int8_gemv_config, launch_int8_gemv

packed = int8_module._cpu_packed

SHAPES = [(72, 200), (40, 136)]  # (hidden, intermediate): no size a multiple of a block


@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_round_trip(transposed):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=gen) * torch.linspace(0.01, 10, 37)[:, None]
    w[5] = 0.0  # an all-zero channel
    m = quantize_int8(w, transposed=transposed)
    assert m.q.dtype == torch.int8 and m.q.is_contiguous()
    assert tuple(m.q.shape) == ((53, 37) if transposed else (37, 53))
    assert m.shape == (37, 53) and m.q.abs().max() == 127
    assert m.scale[5] == 1.0 and (m.weight(torch.float32)[5] == 0).all()
    # every element within half a step of its channel's grid
    err = (m.weight(torch.float32) - w).abs()
    assert (err <= m.scale[:, None] / 2 + 1e-6).all()
    assert (m.weight(torch.float32).abs().amax(dim=1)[m.scale != 1.0] - w.abs().amax(dim=1)[
        m.scale != 1.0
    ]).abs().max() < 1e-5  # the largest weight of a channel is exact  # fmt: skip


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 19])
@pytest.mark.parametrize("shape", [(37, 53), (130, 65), (1, 1)])
def test_gemv_matches_reference(device, shape, rows, dtype, transposed):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=gen)
    m = quantize_int8(w, transposed=transposed)
    m = Int8Matrix(m.q.to(device), m.scale.to(device), transposed)
    x = torch.randn(rows, shape[1], generator=gen).to(dtype).to(device)
    poison_allocator(device, rows * shape[0] + 1024)
    out = launch_int8_gemv(x, m)
    ref = int8_linear_reference(x, m)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 8])
def test_gemv_split_k_matches_reference(device, rows, transposed):
    """K cut into shares added with atomics (what small N gets on a GPU), forced here."""
    gen = torch.Generator().manual_seed(5)
    m = quantize_int8(torch.randn(40, 300, generator=gen), transposed=transposed)
    m = Int8Matrix(m.q.to(device), m.scale.to(device), transposed)
    x = torch.randn(rows, 300, generator=gen).to(device)
    cfg = int8_gemv_config(rows, transposed) | {"SPLIT_K": 3}
    out = launch_int8_gemv(x, m, cfg)
    torch.testing.assert_close(out, int8_linear_reference(x, m), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [2, 70])  # a GEMV, and prefill's dequantized GEMM
def test_int8_linear_with_bias_and_leading_dims(device, rows):
    gen = torch.Generator().manual_seed(3)
    m = quantize_int8(torch.randn(45, 33, generator=gen))
    m = Int8Matrix(m.q.to(device), m.scale.to(device))
    bias = torch.randn(45, generator=gen).to(device)
    x = torch.randn(1, rows, 33, generator=gen).to(device)
    out = int8_linear(x, m, bias)
    assert out.shape == (1, rows, 45)
    ref = int8_linear_reference(x[0], m, bias)
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)
    plain = torch.randn(45, 33, generator=gen).to(device)
    torch.testing.assert_close(linear(x, plain), torch.nn.functional.linear(x, plain))


def test_cpu_misaligned_weight_is_not_packed(monkeypatch):
    """torch's packed int8 kernel segfaults on a weight that does not start on a 64-byte
    boundary (as a tensor read from a safetensors file at an offset does): such a matrix is
    multiplied dequantized instead, with the same product."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(int8_module, "_cpu_packed", lambda x, m: calls.append(1) or packed(x, m))
    gen = torch.Generator().manual_seed(9)
    m = quantize_int8(torch.randn(96, 576, generator=gen))
    buf = torch.empty(m.q.numel() + 64, dtype=torch.int8)
    start = (8 - buf.data_ptr() % 64) % 64  # 8 bytes past a boundary
    q = buf[start : start + m.q.numel()].view(m.q.shape)
    q.copy_(m.q)
    assert q.data_ptr() % 64 == 8
    x = torch.randn(3, 576, generator=gen)
    out = int8_linear(x, Int8Matrix(q, m.scale))
    assert not calls
    torch.testing.assert_close(out, int8_linear_reference(x, m), atol=1e-4, rtol=1e-4)
    int8_linear(x, m)  # the aligned original is packed
    assert calls


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("shape", [(96, 64), (7, 64), (5, 576), (96, 72), (3, 200), (13, 24)])
def test_cpu_packed_path_matches_reference(monkeypatch, shape, rows):
    """On a CPU without the interpreter, few rows go through torch's packed int8 kernel
    (bfloat16 activations, float32 scales applied after) where the input width is one it
    sums right (a multiple of 64); other widths (torch 2.13's kernel gave wrong sums or
    crashed on them on an AVX-512 CPU) are dequantized. Either way the product is right."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(int8_module, "_cpu_packed", lambda x, m: calls.append(1) or packed(x, m))
    gen = torch.Generator().manual_seed(4)
    m = quantize_int8(torch.randn(*shape, generator=gen))
    x = torch.randn(rows, shape[1], generator=gen)
    out = int8_linear(x, m)
    assert out.dtype == torch.float32
    is_packed = shape[1] % int8_module.PACKED_WIDTH_MULTIPLE == 0
    assert bool(calls) == is_packed
    # packed: against the product of the bfloat16-rounded activations (left: the output's
    # rounding); dequantized: float32 throughout
    ref = int8_linear_reference(x.bfloat16().float() if is_packed else x, m)
    tol = 1e-2 if is_packed else 1e-4
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # a transposed matrix (the CPU cannot pack it) still gives the same product
    mt = quantize_int8(m.weight(torch.float32), transposed=True)
    torch.testing.assert_close(
        int8_linear(x, mt), int8_linear_reference(x, m), atol=1e-4, rtol=1e-4
    )


def decode(p, q, path, t_down=None):
    B, H = p.x.shape
    counts = torch.zeros(B + 1, dtype=torch.int32, device=p.x.device)
    down = torch.zeros(B + 1, dtype=torch.int32, device=p.x.device)
    poison_allocator(p.x.device.type, 4 * B * (H + p.w_gate.shape[0]) + 4096)
    out = cats_mlp_decode(
        p.x, q.w_gate, q.w_up, q.w_down_t, p.threshold, active_count=counts, path=path,
        down_threshold=t_down, down_count=down if t_down is not None else None,
    )  # fmt: skip
    return out, counts, down


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("batch", [1, 3, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_reference(device, shape, dtype, batch, path):
    p, q = make_int8_problem(batch, *shape, dtype, device, 0.5, seed=batch)
    out, counts, _ = decode(p, q, path)
    ref, ref_up, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert torch.equal(counts.cpu(), ref_up.cpu())
    assert torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)
    # the int8 weights themselves give the same reference as their dequantized copies
    ref8, _, _ = cats_mlp_reference(p.x, q.w_gate, q.w_up, q.w_down_t, p.threshold)
    torch.testing.assert_close(ref8, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_decode_everything_on_and_off(device, path, sparsity):
    p, q = make_int8_problem(4, *SHAPES[1], torch.float32, device, sparsity, seed=7)
    out, counts, _ = decode(p, q, path)
    ref, ref_up, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert torch.equal(counts.cpu(), ref_up.cpu())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if sparsity == 1.0:
        assert (out == 0).all() and counts[-1] == 0


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_two_threshold_mixed_rows(device, path):
    p, q = make_int8_problem(5, *SHAPES[0], torch.float32, device, 0.3, seed=11)
    t_down = down_thresholds(p, [0.4, 0.0, 0.7, 0.0, 0.4])
    out, counts, down = decode(p, q, path, t_down)
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    assert torch.equal(counts.cpu(), ref_up.cpu()) and torch.equal(down.cpu(), ref_down.cpu())
    assert (ref_down[:-1] < ref_up[:-1]).any()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("down_transposed", [False, True])
def test_cpu_torch_paths(monkeypatch, down_transposed):
    """Without Triton (a CPU as users run it): the gather path and the dense torch path over
    int8 weights, W_down stored either way, with two thresholds."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p, q = make_int8_problem(3, *SHAPES[0], torch.float32, "cpu", 0.5, seed=2,
                             down_transposed=down_transposed)  # fmt: skip
    t_down = down_thresholds(p, [0.4, 0.0, 0.7])
    ref, ref_up, ref_down = cats_mlp_reference(
        p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, down_threshold=t_down
    )
    counts = torch.zeros(4, dtype=torch.int32)
    down = torch.zeros(4, dtype=torch.int32)
    out = cats_mlp_gather(p.x, q.w_gate, q.w_up, q.w_down_t, p.threshold, counts, None, t_down,
                          down)  # fmt: skip
    assert torch.equal(counts, ref_up) and torch.equal(down, ref_down)
    # packed int8 products take bfloat16 activations
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    dense, _, _ = cats_mlp_torch(p.x, q.w_gate, q.w_up, q.w_down_t, p.threshold,
                                 down_threshold=t_down)  # fmt: skip
    torch.testing.assert_close(dense, ref, atol=3e-2, rtol=3e-2)


def test_prefill_matches_reference(device):
    p, q = make_int8_problem(70, *SHAPES[1], torch.float32, device, 0.5, seed=3)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    out = cats_mlp_prefill(p.x, q.w_gate, q.w_up, q.w_down_t, p.threshold, active_count=count)
    ref, ref_up, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert count.item() == ref_up[:-1].sum().item()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bad_int8_weights_are_named(device):
    p, q = make_int8_problem(2, *SHAPES[1], torch.float32, device, 0.5, seed=1)
    with pytest.raises(ValueError, match="w_up must be int8"):
        cats_mlp_decode(p.x, q.w_gate, p.w_up, q.w_down_t, p.threshold)
    flat = quantize_int8(p.w_down_t.t().cpu(), transposed=False)
    flat = Int8Matrix(flat.q.to(device), flat.scale.to(device))
    with pytest.raises(ValueError, match="stored transposed"):
        cats_mlp_decode(p.x, q.w_gate, q.w_up, flat, p.threshold, path="sparse")
    wrong = Int8Matrix(q.w_up.q, q.w_up.scale[:-1])
    with pytest.raises(ValueError, match=r"w_up.scale must have shape"):
        cats_mlp_decode(p.x, q.w_gate, wrong, q.w_down_t, p.threshold)
