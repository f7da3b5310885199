"""Int8 weights made once and kept on disk: `--quantize int8` quantizes every linear layer at
the first load of a checkpoint and writes the int8 matrices and their scales to one safetensors
file under the cache dir; later loads read it instead of quantizing again.

The file's name is its key: the checkpoint's weights fingerprint (calibration.fingerprint, so a
changed source gives a new file), the quantization scheme's version (`SCHEME`: change it with
any change to `quantize_int8`), the layout of W_down (transposed where the Triton kernels read
it) and whether the LM head is int8. A file that cannot be read, or lacks a matrix, is ignored
and written anew; a write goes through a temporary file renamed into place, so two servers
starting at once or a crash leave no half-written file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from cats_serve.kernels.int8 import Int8Matrix

log = logging.getLogger(__name__)

SCHEME = "sym-per-channel-v1"  # symmetric, one float32 scale per output channel, q in [-127, 127]


def int8_cache_file(
    cache_dir: Path, fingerprint: str, *, down_transposed: bool, int8_lm_head: bool
) -> Path:
    """Where the int8 weights of the checkpoint with `fingerprint` are kept."""
    digest = fingerprint.removeprefix("sha256:")
    layout = ("down-t" if down_transposed else "down") + ("" if int8_lm_head else "-fp-head")
    return cache_dir / "int8" / f"{digest}-{SCHEME}-{layout}.safetensors"


def read_int8_cache(path: Path, device: torch.device) -> dict[str, Int8Matrix]:
    """The matrices kept in `path` by their checkpoint names, on `device`; empty if the file is
    missing or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        out: dict[str, Int8Matrix] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                name, _, part = key.rpartition(".")
                if part == "q":
                    # clone: a tensor read here starts 8 bytes past a 64-byte boundary, which
                    # torch's packed int8 kernel cannot take (kernels/int8.py)
                    out[name] = Int8Matrix(
                        f.get_tensor(key).clone(),
                        f.get_tensor(f"{name}.scale").clone(),
                        meta.get(name) == "transposed",
                    )
        return out
    except Exception as exc:  # any damage (safetensors' own error too): quantize again
        log.warning("ignoring unreadable int8 cache %s (%s); quantizing again", path, exc)
        return {}


def write_int8_cache(path: Path, matrices: dict[str, Int8Matrix]) -> None:
    """Write `matrices` (checkpoint name -> int8 matrix) to `path` atomically; a failure to
    write (a read-only cache dir) is logged and otherwise ignored."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, m in matrices.items():
        tensors[f"{name}.q"] = m.q.contiguous().cpu()
        tensors[f"{name}.scale"] = m.scale.contiguous().cpu()
        meta[name] = "transposed" if m.transposed else "rows"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the int8 cache %s (%s); the next start quantizes again",
                    path, exc)  # fmt: skip
        return
    log.info("int8 weights written to %s (later starts read them)", path)
