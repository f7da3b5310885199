"""Loading, the one way the server and the calibration CLIs share: a `--model` value -> a
checkpoint directory -> our decoder, its tokenizer and weights fingerprint; then thresholds
files validated against that model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cats_serve.calibration.fingerprint import weights_fingerprint
from cats_serve.calibration.levels import format_level, match_level
from cats_serve.calibration.thresholds_file import ModelInfo, ThresholdsFile, load_thresholds
from cats_serve.kernels.runtime import triton_available_for
from cats_serve.server.model.config import ModelConfig, rope_inv_freq
from cats_serve.server.model.decoder import LlamaModel
from cats_serve.server.model.int8_cache import int8_cache_file, read_int8_cache, write_int8_cache
from cats_serve.server.model.sources import DEFAULT_MODEL, resolve_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaModel
    hf_config: object  # the transformers config the model was built from
    fingerprint: str  # of the checkpoint's weights (calibration.fingerprint)
    checkpoint: Path
    tokenizer: object | None = None
    name: str = ""  # the name thresholds files record (the --model value's last part)

    def info(self) -> ModelInfo:
        """What a thresholds file made for this model records about it."""
        c = self.model.config
        return ModelInfo(
            self.name, c.num_layers, c.hidden_size, c.intermediate_size, self.fingerprint
        )

    def eos_token_ids(self) -> set[int]:
        """End-of-sequence ids: the tokenizer's, the config's and generation_config.json's."""
        candidates = [self.tokenizer.eos_token_id, getattr(self.hf_config, "eos_token_id", None)]
        try:
            from transformers import GenerationConfig

            candidates.append(GenerationConfig.from_pretrained(self.checkpoint).eos_token_id)
        except OSError:
            pass  # no generation_config.json: the tokenizer's and config's EOS are enough
        ids: set[int] = set()
        for c in candidates:
            if isinstance(c, int):
                ids.add(c)
            elif isinstance(c, list | tuple):
                ids.update(int(x) for x in c)
        return ids

    def load_thresholds(self, path: Path) -> ThresholdsFile:
        """A thresholds file, validated against this model (ValueError names the mismatch)."""
        c = self.model.config
        return load_thresholds(
            path,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            fingerprint=self.fingerprint,
        )


def resolve_device(name: str) -> str:
    """'auto' -> CUDA when present, else the CPU; a CUDA device asked for must exist."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on the CPU; else one of DTYPES."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def load_pretrained(
    model: str, *, cache_dir: Path, device: str, dtype: str, quantize: str = "none",
    int8_lm_head: bool = True,
) -> LoadedModel:  # fmt: skip
    """`model` (the default model's name, a .gguf file or an HF directory) with its tokenizer,
    on `device` ('auto' allowed) in `dtype` ('auto' allowed); quantize "int8" for int8
    weights (the LM head too unless int8_lm_head is False)."""
    from transformers import AutoTokenizer

    device = resolve_device(device)
    checkpoint = resolve_checkpoint(model, cache_dir)
    loaded = load_model(
        checkpoint, dtype=resolve_dtype(dtype, device), device=device, quantize=quantize,
        int8_lm_head=int8_lm_head, cache_dir=cache_dir,
    )  # fmt: skip
    loaded.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    loaded.name = model if model == DEFAULT_MODEL else Path(model).name
    return loaded


def load_model(
    checkpoint: Path, *, dtype: torch.dtype, device: str, quantize: str = "none",
    int8_lm_head: bool = True, cache_dir: Path | None = None,
) -> LoadedModel:  # fmt: skip
    """Our decoder from a local HF checkpoint directory (no tokenizer). With int8 weights and
    a cache_dir, the int8 matrices are read from (or, the first time, written to) the int8
    cache there (server/model/int8_cache.py)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(checkpoint)
    config = ModelConfig.from_hf(hf)
    inv_freq, scaling = rope_inv_freq(hf, config.head_dim)
    state = read_state_dict(checkpoint)
    fingerprint = weights_fingerprint(state)
    cache_file, quantized = None, {}
    if quantize == "int8" and cache_dir is not None:
        cache_file = int8_cache_file(
            cache_dir, fingerprint, down_transposed=triton_available_for(torch.device(device)),
            int8_lm_head=int8_lm_head,
        )  # fmt: skip
        quantized = read_int8_cache(cache_file, torch.device(device))
    kept = set(quantized)
    model = LlamaModel(
        config, state, inv_freq, scaling, dtype=dtype, device=device, quantize=quantize,
        int8_lm_head=int8_lm_head, quantized=quantized,
    )  # fmt: skip
    if cache_file is not None and set(quantized) != kept:
        write_int8_cache(cache_file, quantized)
    return LoadedModel(model, hf, fingerprint, checkpoint, name=checkpoint.name)


def load_levels(loaded: LoadedModel, paths: list[Path]) -> dict[float, ThresholdsFile]:
    """Thresholds files served together, by level. One batch mixes levels through per-row
    thresholds, but the kernels take one set of per-neuron weights per layer, so the files
    must share their criterion and weights. ValueError names the file and the mismatch."""
    levels: dict[float, ThresholdsFile] = {}
    for path in paths:
        tf = loaded.load_thresholds(path)
        same = match_level(tf.target_sparsity, levels)
        if same is not None:
            raise ValueError(
                f"{path}: a second thresholds file for level {format_level(tf.target_sparsity)} "
                f"(also {levels[same].path})"
            )
        first = next(iter(levels.values()), tf)
        if tf.criterion != first.criterion:
            raise ValueError(
                f"{tf.path}: criterion {tf.criterion!r} differs from {first.path}'s "
                f"{first.criterion!r}; the levels served together must share one criterion "
                "(calibrate them in one cats-calibrate run)"
            )
        if tf.neuron_scale != first.neuron_scale:
            raise ValueError(
                f"{tf.path}: neuron_scale differs from {first.path}'s; the levels served "
                "together must share one set of per-neuron weights (calibrate them in one "
                "cats-calibrate run)"
            )
        levels[tf.target_sparsity] = tf
    return levels


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors shards, else transformers' loader)."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        return state
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(checkpoint).state_dict())
