"""The GGUF conversion cache: keyed by file content, shared, written atomically, clearable."""

from __future__ import annotations

import json
import os

import pytest

from cats_serve.server import cli
from cats_serve.server.model import conversion_cache
from cats_serve.server.model.conversion_cache import ModelSourceError, converted_gguf


@pytest.fixture
def conversions(monkeypatch) -> list:
    """Replace the (slow) transformers conversion by one that writes the two marker files."""
    done = []

    def fake_convert(gguf, out):
        done.append(gguf)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(gguf.read_bytes())

    monkeypatch.setattr(conversion_cache, "_convert", fake_convert)
    return done


def gguf(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_the_same_file_in_two_places_is_converted_once(tmp_path, conversions):
    cache = tmp_path / "cache"
    a = converted_gguf(gguf(tmp_path / "venv-a" / "m.gguf", b"weights"), cache)
    b = converted_gguf(gguf(tmp_path / "venv-b" / "m.gguf", b"weights"), cache)
    assert a == b and len(conversions) == 1
    assert (a / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in (cache / "models").iterdir()] == [a.name]  # no temporary left


def test_a_changed_file_is_converted_anew(tmp_path, conversions):
    cache, path = tmp_path / "cache", gguf(tmp_path / "m.gguf", b"one")
    first = converted_gguf(path, cache)
    path.write_bytes(b"two")
    os.utime(path, ns=(1, 1))  # a new mtime, as any rewrite gives
    second = converted_gguf(path, cache)
    assert first != second and len(conversions) == 2


def test_the_digest_is_remembered(tmp_path, conversions, monkeypatch):
    cache, path = tmp_path / "cache", gguf(tmp_path / "m.gguf", b"weights")
    converted_gguf(path, cache)
    [entry] = json.loads((cache / "digests.json").read_text()).values()
    assert len(entry) == 64
    monkeypatch.setattr(conversion_cache.hashlib, "sha256", None)  # a re-hash would fail
    assert converted_gguf(path, cache).name.endswith(entry[:16])


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(gguf, out):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        raise ValueError("not a GGUF file")

    monkeypatch.setattr(conversion_cache, "_convert", broken)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        converted_gguf(gguf(tmp_path / "m.gguf", b"junk"), cache)
    assert list((cache / "models").iterdir()) == []


def test_clear_cache_removes_the_converted_models(tmp_path, conversions, capsys):
    cache = tmp_path / "cache"
    converted_gguf(gguf(tmp_path / "m.gguf", b"weights"), cache)
    assert cli.main(["--cache-dir", str(cache), "--clear-cache"]) == 0
    assert not (cache / "models").exists()
    assert "removed" in capsys.readouterr().out
