"""The model flags both calibration CLIs take, and loading through the server's own loader."""

from __future__ import annotations

import argparse
from pathlib import Path

from cats_serve.server.model.conversion_cache import default_cache_dir
from cats_serve.server.model.loader import DTYPES, LoadedModel, load_pretrained
from cats_serve.server.model.sources import DEFAULT_MODEL
from cats_serve.server.model.weights import QUANTIZE


def model_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the model flags, whose --help shows every default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{description} Settings are flags only (no environment variables).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(parser)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"'{DEFAULT_MODEL}' (default), a .gguf file or an HF checkpoint directory",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype")
    parser.add_argument(
        "--quantize", default="none", choices=QUANTIZE,
        help="weights: none (--dtype) or int8 (as cats-serve --quantize int8)",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="converted-model cache"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model and tokenizer the flags name, loaded the way the server loads them."""
    return load_pretrained(
        args.model,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
    )
