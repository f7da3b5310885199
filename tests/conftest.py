"""Shared fixtures: tiny random checkpoints built once per session, offline."""

from __future__ import annotations

import pytest
from tiny_model import build_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama checkpoint directory with its tokenizer."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory):
    """The default model (SmolLM2-135M-Instruct) converted from its packaged GGUF.

    Uses the user's cache dir, so the ~15 s conversion happens once per machine.
    """
    from cats_serve.server.model_source import resolve_checkpoint
    from cats_serve.server.settings import DEFAULT_MODEL, default_cache_dir

    return resolve_checkpoint(DEFAULT_MODEL, default_cache_dir())


def pytest_collection_modifyitems(config, items):
    """Run tests marked slow (real default model, processes) after the quick ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
