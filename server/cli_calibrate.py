"""`cats-calibrate`: make CATS thresholds files for a model (see calibration/README.md).

    cats-calibrate --model SmolLM2-135M-Instruct --sparsity 0.3 0.5 --mode both --out DIR

Loads the model with the server's own code, then hands it to cats_serve.calibration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from cats_serve.calibration.allocate import SENSITIVITY_GRID
from cats_serve.calibration.calibrate import CalibrationConfig, calibrate, file_name
from cats_serve.calibration.text_data import BUILTIN_SOURCES, TextDataError
from cats_serve.calibration.thresholds_file import CRITERIA, MODES, ModelInfo, save_thresholds
from cats_serve.server.settings import DEFAULT_MODEL, default_cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelForQuality:
    model: object  # server.model.LlamaModel
    tokenizer: object
    info: ModelInfo


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_for_quality(model: str, *, device: str, dtype: str, cache_dir: Path) -> ModelForQuality:
    """Load `model` (default name, .gguf or HF dir) and its tokenizer the way the server does."""
    from transformers import AutoTokenizer

    from cats_serve.server.model import load_model
    from cats_serve.server.model_source import resolve_checkpoint

    checkpoint = resolve_checkpoint(model, cache_dir)
    loaded = load_model(checkpoint, dtype=DTYPES[dtype], device=resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    c = loaded.model.config
    name = model if model == DEFAULT_MODEL else Path(model).name
    info = ModelInfo(name, c.num_layers, c.hidden_size, c.intermediate_size, loaded.fingerprint)
    return ModelForQuality(loaded.model, tokenizer, info)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"'{DEFAULT_MODEL}' (default), a .gguf file or an HF checkpoint directory",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cats-calibrate", description="Calibrate CATS thresholds files for a model."
    )
    add_model_args(parser)
    parser.add_argument(
        "--sparsity", type=float, nargs="+", required=True, help="target levels, e.g. 0.3 0.5"
    )
    parser.add_argument(
        "--data",
        default="lambada",
        help=f"built-in text ({', '.join(BUILTIN_SOURCES)}) or a UTF-8 text file "
        "(documents = paragraphs; every 10th is held out)",
    )
    parser.add_argument(
        "--search-data",
        default=None,
        help="text the allocated mode's KL is measured on (same choices as --data; "
        "default: --data's calibration documents)",
    )
    parser.add_argument(
        "--mode", choices=[*MODES, "both"], default="both", help="uniform CATS, allocated, both"
    )
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="up_rms",
        help="neuron score: up_rms = |SiLU(gate)| x the neuron's up-projection RMS (default), "
        "silu = |SiLU(gate)| (the CATS paper)",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON files")
    parser.add_argument("--max-tokens", type=int, default=32_768, help="calibration tokens")
    parser.add_argument("--documents", type=int, default=None, help="at most this many documents")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument(
        "--search-tokens", type=int, default=1024, help="tokens the allocated mode's KL uses"
    )
    parser.add_argument(
        "--search-questions",
        type=int,
        default=0,
        help="allocated mode: also measure the answer KL on this many multiple-choice questions "
        "of tasks that are not evaluated (built-in; 0 = token KL only)",
    )
    parser.add_argument(
        "--refine-rounds",
        type=int,
        default=4,
        help="allocated mode: rounds of joint refinement (2 x layers + 2 forward passes each)",
    )
    parser.add_argument(
        "--max-layer-sparsity",
        type=float,
        default=SENSITIVITY_GRID[-1],
        help="allocated mode: no layer sparser than this",
    )
    parser.add_argument(
        "--heldout-tokens", type=int, default=16_384, help="held-out tokens for realised sparsity"
    )
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per forward pass")
    return parser


def calibration_config(args: argparse.Namespace) -> CalibrationConfig:
    return CalibrationConfig(
        levels=args.sparsity,
        modes=list(MODES) if args.mode == "both" else [args.mode],
        criterion=args.criterion,
        data=args.data,
        search_data=args.search_data,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        max_documents=args.documents,
        batch_tokens=args.batch_tokens,
        search_tokens=args.search_tokens,
        search_questions=args.search_questions,
        refine_rounds=args.refine_rounds,
        max_layer_sparsity=args.max_layer_sparsity,
        heldout_tokens=args.heldout_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    try:
        config = calibration_config(args)
    except ValueError as e:
        print(f"cats-calibrate: {e}", file=sys.stderr)
        return 2
    loaded = load_for_quality(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir or default_cache_dir(),
    )
    try:
        files = calibrate(
            loaded.model, loaded.tokenizer, loaded.info, config, progress=not args.no_progress
        )
    except TextDataError as e:  # built-in text missing, or --data not readable
        print(f"cats-calibrate: {e}", file=sys.stderr)
        return 2
    print(
        f"{'file':<48} {'mode':<10} {'target':>6} {'mean':>6} {'held-out':>8} {'KL':>8} "
        f"{'answer KL':>9}"
    )
    for f in files:
        name = file_name(f.model_name, f.mode, f.target_sparsity, f.criterion)
        path = save_thresholds(f, args.out / name)
        answer_kl = f.extra.get("calibration_answer_kl_vs_dense")
        print(
            f"{path!s:<48} {f.mode:<10} {f.target_sparsity:>6.2f} {f.mean_sparsity:>6.3f} "
            f"{f.heldout.mean_sparsity:>8.3f} {f.extra['calibration_kl_vs_dense']:>8.4f} "
            f"{'-' if answer_kl is None else format(answer_kl, '.4f'):>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
