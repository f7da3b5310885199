"""Kernel tests run compiled on CUDA when present, otherwise through Triton's interpreter
(the kernels were defined in interpreter mode by tests/conftest.py)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _route_cpu_to_kernels(monkeypatch):
    """On CPU, send tensors to the interpreted kernels instead of the PyTorch fallback."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """The device the kernels run on: compiled CUDA, else the CPU interpreter."""
    return DEVICE
