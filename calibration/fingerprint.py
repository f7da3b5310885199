"""A short fingerprint of a checkpoint's weights, to tie a thresholds file to its model.

It hashes every tensor's name, shape and stored dtype plus a strided sample of its raw bytes,
as read from the checkpoint, before any dtype conversion: the same checkpoint gives the same
fingerprint whether it is served in float32 on a CPU or bfloat16 on a GPU.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLES_PER_TENSOR = 256


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].contiguous().cpu()
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]
