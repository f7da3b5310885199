"""Where the Triton kernels can run: compiled on CUDA, or through Triton's CPU interpreter."""

import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``), read at call time.

    The variable only takes effect when set before ``triton`` is imported (the test suite's
    conftest does that); reading it here lets the launchers route CPU tensors to the kernels
    under the interpreter and to plain PyTorch otherwise.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available_for(device: torch.device) -> bool:
    """True when Triton kernels can run on tensors of ``device``."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
