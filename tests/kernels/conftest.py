"""Kernel tests run compiled on CUDA when present, otherwise through Triton's interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton`: Triton fixes its mode at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """The device the kernels run on: compiled CUDA, else the CPU interpreter."""
    return DEVICE
