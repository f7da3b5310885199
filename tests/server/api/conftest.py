"""Fixtures of the in-process API tests: the tiny model, a thresholds file for it, one app."""

from __future__ import annotations

import pytest
from api_support import TINY_HALF_THRESHOLD, serve_app, write_thresholds
from transformers import AutoTokenizer

from cats_serve.server.api.app import create_app
from cats_serve.server.settings import Settings


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def model(tiny_checkpoint) -> str:
    """The name the tiny model is served under."""
    return tiny_checkpoint.name


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def half_thresholds(tiny_checkpoint, tmp_path_factory):
    """A thresholds file at level 0.5 for the tiny model (about half its neurons off)."""
    out = tmp_path_factory.mktemp("thr") / "t50.json"
    return write_thresholds(tiny_checkpoint, 0.5, TINY_HALF_THRESHOLD, out)


@pytest.fixture(scope="session")
async def client(tiny_checkpoint, half_thresholds):
    """The tiny model served with its 0.5 level loaded (dense by default), lifespan running."""
    settings = Settings(model=str(tiny_checkpoint), device="cpu", thresholds=[half_thresholds])
    async with serve_app(create_app(settings)) as c:
        yield c
