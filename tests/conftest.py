"""Shared fixtures: tiny random checkpoints built once per session, offline.

Without a GPU the kernel tests run through Triton's interpreter. Triton makes a kernel
interpreted or compiled when the kernel is defined, so the kernel modules are defined here, in
interpreter mode, before any test imports them; then the variable is cleared, so the rest of the
suite, and every `cats-serve` process it starts, runs the CPU path in plain PyTorch as users
get it. tests/kernels sets the variable again around each kernel test, which routes CPU tensors
to the (interpreted) kernels.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

# `python -m pytest` run from the checkout puts its root first on sys.path, where the `kernels/`
# folder (installed as cats_serve.kernels) would hide Hugging Face's `kernels` package, which
# transformers imports: take the root off again before anything imports transformers.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_model import build_checkpoint  # noqa: E402

if not torch.cuda.is_available():
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import cats_serve.kernels as _kernels

    for _module in pkgutil.walk_packages(_kernels.__path__, f"{_kernels.__name__}."):
        importlib.import_module(_module.name)
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama checkpoint directory with its tokenizer."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def long_checkpoint(tmp_path_factory):
    """The tiny random model with a long context, plus a thresholds file for level 0.5."""
    from api_support import LONG_CONTEXT, TINY_HALF_THRESHOLD, write_thresholds

    path = build_checkpoint(
        tmp_path_factory.mktemp("tiny-long") / "tiny-long", max_position_embeddings=LONG_CONTEXT
    )
    write_thresholds(path, 0.5, TINY_HALF_THRESHOLD, path / "thresholds-0.5.json")
    return path


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory):
    """The default model (SmolLM2-135M-Instruct) converted from its packaged GGUF.

    Uses the user's cache dir, so the ~15 s conversion happens once per machine.
    """
    from cats_serve.server.model.sources import resolve_checkpoint
    from cats_serve.server.settings import DEFAULT_MODEL, default_cache_dir

    return resolve_checkpoint(DEFAULT_MODEL, default_cache_dir())


def pytest_collection_modifyitems(config, items):
    """Run tests marked slow (real default model, processes) after the quick ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
