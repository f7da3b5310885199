"""GGUF files turned into cached HF checkpoint directories.

transformers dequantizes a GGUF file once (~15 s for the default model); the result is saved as
an ordinary safetensors directory under the cache dir, so later starts load in about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class ModelSourceError(RuntimeError):
    """The model named in the settings cannot be found or read."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/cats-serve`, else `~/.cache/cats-serve` (where converted models live)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cats-serve"


def file_digest(path: Path, cache_dir: Path) -> str:
    """sha256 of the file's content, remembered in `cache_dir/digests.json` by path, size and
    mtime, so a file is read through once however often it is served."""
    index_path = cache_dir / "digests.json"
    stat = path.stat()
    seen = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if seen not in index:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        index[seen] = digest.hexdigest()
        _write_atomically(index_path, json.dumps(index, indent=1))
    return index[seen]


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    """The HF checkpoint directory converted from `gguf`, under `cache_dir/models/`, keyed by
    the file's content: every environment of a user shares one copy, and a changed file is
    converted anew. Conversion writes a private temporary directory renamed into place, so
    neither a crash nor two servers converting at once leave a half-written copy."""
    target = cache_dir / "models" / f"{gguf.stem}-{file_digest(gguf, cache_dir)[:16]}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to safetensors under %s (once; later starts reuse it)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _convert(gguf, tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSourceError(f"cannot read GGUF file {gguf}: {exc}") from exc
    shutil.rmtree(target, ignore_errors=True)  # an incomplete copy (a crash of an older version)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same conversion first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from config + weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
