"""The int8 weight cache (server/model/int8_cache.py): the first int8 load of a checkpoint
writes its int8 matrices under the cache dir, later loads read them instead of quantizing, and
a changed checkpoint, LM-head choice or damaged file makes a new one."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_model import build_checkpoint

from cats_serve.kernels.int8 import Int8Matrix
from cats_serve.server.model import weights
from cats_serve.server.model.loader import load_model


def load(path, cache_dir, **kw):
    return load_model(path, dtype=torch.float32, device="cpu", quantize="int8",
                      cache_dir=cache_dir, **kw).model  # fmt: skip


def matrices(model) -> list[Int8Matrix]:
    out = [model.lm_head] if isinstance(model.lm_head, Int8Matrix) else []
    for layer in model.layers:
        out += [layer.wqkv, layer.wo, layer.w_gate, layer.w_up, layer.w_down_t]
    return out


def no_quantizing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("quantized although the int8 cache holds the matrix")

    monkeypatch.setattr(weights, "quantize_int8", fail)


@pytest.fixture
def checkpoint(tmp_path):
    return build_checkpoint(tmp_path / "ckpt", "llama", seed=4)


@torch.inference_mode()
def test_second_load_reads_what_the_first_wrote(checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load(checkpoint, cache)
    files = list((cache / "int8").glob("*.safetensors"))
    assert len(files) == 1
    n_layers = first.config.num_layers
    assert len(load_file(files[0])) == 2 * (5 * n_layers + 1)  # q and scale per matrix
    no_quantizing(monkeypatch)
    second = load(checkpoint, cache)
    for a, b in zip(matrices(first), matrices(second), strict=True):
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
        assert a.transposed == b.transposed
        # torch's packed int8 kernel segfaults on a weight off a 64-byte boundary, where a
        # tensor read straight from the file starts
        assert b.q.data_ptr() % 64 == 0
    tokens = torch.randint(3, 380, (1, 12), generator=torch.Generator().manual_seed(0))
    real = torch.ones_like(tokens, dtype=torch.bool)
    t = torch.zeros(n_layers)
    assert torch.equal(first.score(tokens, real, t), second.score(tokens, real, t))


def test_the_key_follows_the_weights_and_the_head(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    load(checkpoint, cache)
    load(checkpoint, cache, int8_lm_head=False)  # another layout: a file of its own
    assert len(list((cache / "int8").glob("*.safetensors"))) == 2
    state = load_file(checkpoint / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] *= 2.0  # a changed source
    save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})
    changed = load(checkpoint, cache)
    assert len(list((cache / "int8").glob("*.safetensors"))) == 3
    fresh = load(checkpoint, None)  # no cache at all: quantized from the changed weights
    assert torch.equal(changed.layers[0].w_up.q, fresh.layers[0].w_up.q)


def test_a_damaged_file_is_quantized_again_and_rewritten(checkpoint, tmp_path, caplog):
    cache = tmp_path / "cache"
    good = load(checkpoint, cache)
    (file,) = (cache / "int8").glob("*.safetensors")
    file.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        again = load(checkpoint, cache)
    assert "ignoring unreadable int8 cache" in caplog.text
    assert torch.equal(again.layers[1].wo.q, good.layers[1].wo.q)
    assert len(load_file(file)) > 0  # written anew


def test_full_precision_loads_write_no_cache(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    load_model(checkpoint, dtype=torch.float32, device="cpu", cache_dir=cache)
    assert not (cache / "int8").exists()
