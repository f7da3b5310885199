"""Everything the HTTP layer serves, built from Settings: model, tokenizer, thresholds, engine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cats_serve.calibration.levels import format_level, format_levels, match_level
from cats_serve.calibration.shipped import DEFAULT_SPARSITY, default_thresholds_files
from cats_serve.server.engine.engine import Engine
from cats_serve.server.model.loader import load_levels, load_pretrained
from cats_serve.server.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """Startup cannot go on; the message says which file or setting and why."""


@dataclass
class ServingModel:
    name: str
    engine: Engine
    tokenizer: object
    device: str
    dtype: str
    weights: str  # what the linear layers' weights are: the dtype, or "int8" (see weights_label)
    levels: list[float]  # loaded sparsity levels, 0.0 (dense) first
    default_sparsity: float
    default_temperature: float  # for requests that omit temperature
    max_seq_len: int
    max_token_chars: int  # the longest token's characters: a prompt has >= len / this tokens


def weights_label(settings: Settings, dtype: str) -> str:
    """'int8', 'int8 (lm_head <dtype>)' with a full-precision LM head, else the dtype."""
    if settings.quantize == "none":
        return dtype
    return "int8" if settings.int8_lm_head else f"int8 (lm_head {dtype})"


def served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(settings.model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def cpu_threads(settings: Settings) -> int:
    """torch's intra-op threads on CPU: the setting, else the CPUs this process may use less
    one, at least 1. On the 2-core machine one thread served faster than two, fp32 and int8,
    at one and four clients (benchmarks/results/bench_serving_cpu_threads_matrix.json): the
    HTTP server's thread then has a core of its own."""
    if settings.cpu_threads is not None:
        return settings.cpu_threads
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, (len(available) if available else os.cpu_count() or 1) - 1)


def load_serving(settings: Settings) -> ServingModel:
    """Load model and thresholds and start the engine; raises StartupError on any bad input."""
    log.info("loading %s", settings.model)
    try:
        loaded = load_pretrained(
            settings.model,
            cache_dir=settings.cache_dir,
            device=settings.device,
            dtype=settings.dtype,
            quantize=settings.quantize,
            int8_lm_head=settings.int8_lm_head,
        )
    except Exception as exc:
        raise StartupError(f"cannot load model {settings.model!r}: {exc}") from exc
    model = loaded.model
    try:
        files = load_levels(loaded, _thresholds_files(settings))
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    levels = {level: tf.threshold_pairs() for level, tf in files.items()}
    first = next(iter(files.values()), None)
    model.set_neuron_scale(first.neuron_scale if first else None)
    default = _default_sparsity(settings, levels)
    device, dtype = str(model.device), str(model.dtype).removeprefix("torch.")
    engine = Engine(
        model,
        loaded.tokenizer,
        levels=levels,
        max_batch=settings.max_batch_size,
        max_seq_len=min(settings.max_seq_len, model.config.max_position_embeddings),
        max_queue=settings.max_queue_size,
        max_prefill_tokens=settings.max_prefill_tokens,
        eos_token_ids=loaded.eos_token_ids(),
        use_cuda_graphs=settings.cuda_graphs and device.startswith("cuda"),
        pipeline=settings.pipeline_steps and device.startswith("cuda"),
        torch_threads=cpu_threads(settings) if device == "cpu" else None,
    )
    log.info(
        "loaded %s on %s (%s, weights %s), sparsity levels %s, default %s",
        settings.model,
        device if device != "cpu" else f"cpu, {engine.torch_threads} threads",
        dtype,
        weights_label(settings, dtype),
        format_levels(engine.levels),
        format_level(default),
    )
    return ServingModel(
        name=served_name(settings),
        engine=engine,
        tokenizer=loaded.tokenizer,
        device=device,
        dtype=dtype,
        weights=weights_label(settings, dtype),
        levels=sorted(engine.levels),
        default_sparsity=default,
        default_temperature=settings.default_temperature,
        max_seq_len=engine.max_seq_len,
        max_token_chars=max(len(token) for token in loaded.tokenizer.get_vocab()),
    )


def _thresholds_files(settings: Settings) -> list[Path]:
    if settings.thresholds is not None:
        return list(settings.thresholds)
    if settings.model == DEFAULT_MODEL:
        return default_thresholds_files()
    return []


def _default_sparsity(settings: Settings, levels: dict) -> float:
    if settings.default_sparsity is not None:
        level = match_level(settings.default_sparsity, [0.0, *levels])
        if level is None:
            raise StartupError(
                f"default_sparsity={format_level(settings.default_sparsity)} is not a loaded "
                f"level (loaded thresholds: {format_levels(levels)}; 0 = dense)"
            )
        return level
    if settings.thresholds is None and settings.model == DEFAULT_MODEL:
        return DEFAULT_SPARSITY
    return 0.0
