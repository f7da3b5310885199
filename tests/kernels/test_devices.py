"""Kernels launch on their tensors' GPU, not on the current one (Triton's default)."""

import pytest
import torch
from problems import make_problem
from tolerances import TOLERANCES

from cats_serve.kernels import (
    cats_mlp_decode,
    cats_mlp_prefill,
    cats_mlp_reference,
    decode_attention,
    decode_attention_reference,
)
from cats_serve.kernels.runtime import on_tensor_device

needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs (the second holds the tensors)"
)


@needs_two_gpus
@pytest.mark.parametrize("path", ["sparse", "dense", "prefill"])
def test_mlp_runs_on_the_second_gpu(path):
    torch.cuda.set_device(0)
    p = make_problem(1 if path == "sparse" else 3, 72, 200, torch.bfloat16, "cuda:1", 0.5, seed=2)
    counts = torch.zeros(p.x.shape[0] + 1, dtype=torch.int32, device="cuda:1")
    if path == "prefill":
        out = cats_mlp_prefill(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    else:
        out = cats_mlp_decode(
            p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold, active_count=counts, path=path
        )
    ref, ref_counts, _ = cats_mlp_reference(p.x, p.w_gate, p.w_up, p.w_down_t, p.threshold)
    assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)
    if path != "prefill":
        assert torch.equal(counts.cpu(), ref_counts.cpu())


@needs_two_gpus
def test_attention_runs_on_the_second_gpu():
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(4)
    k, v = (torch.randn(3, 2, 96, 64, generator=gen).bfloat16().to("cuda:1") for _ in range(2))
    q = torch.randn(3, 8, 64, generator=gen).bfloat16().to("cuda:1")
    positions = torch.tensor([0, 40, 95], device="cuda:1")
    out = decode_attention(q, k, v, positions, 96)
    ref = decode_attention_reference(q, k, v, positions, 96)
    assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, ref, atol=tol.atol, rtol=tol.rtol)


class OnDevice:
    """Stands in for a tensor: only its device is read."""

    def __init__(self, device: str):
        self.device = torch.device(device)


@pytest.mark.parametrize(
    ("device", "current", "switched"),
    [("cuda:1", 0, "cuda:1"), ("cuda:0", 0, None), ("cuda", 0, None), ("cpu", 0, None)],
)
def test_launcher_switches_to_its_tensors_gpu(monkeypatch, device, current, switched):
    """The guard's logic without GPUs: it enters torch.cuda.device(t.device) only for a GPU
    other than the current one, and the launcher runs inside it with its arguments."""
    entered = []

    class Recording:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            entered.append(str(self.d))

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", Recording)
    calls = []

    @on_tensor_device
    def launcher(t, a, *, b):
        calls.append((t, a, b, list(entered)))
        return "out"

    t = OnDevice(device)
    assert launcher(t, 1, b=2) == "out"
    assert calls == [(t, 1, 2, [switched] if switched else [])]
    assert entered == ([switched, "exit"] if switched else [])
