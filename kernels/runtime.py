"""Where the Triton kernels can run (compiled on CUDA, or through Triton's CPU interpreter),
and on which GPU they launch."""

import contextlib
import functools
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


def on_tensor_device(launcher):
    """Run `launcher(t, ...)` with t's GPU as the current device.

    Triton launches a kernel on the current CUDA device, whatever device its tensors are on, so
    a model on cuda:1 would otherwise get kernels launched on cuda:0. A no-op for CPU tensors
    and when t's GPU is already current.
    """

    @functools.wraps(launcher)
    def launch(t: torch.Tensor, *args, **kwargs):
        if t.device.type != "cuda" or t.device.index in (None, torch.cuda.current_device()):
            guard = contextlib.nullcontext()
        else:
            guard = torch.cuda.device(t.device)
        with guard:
            return launcher(t, *args, **kwargs)

    return launch
