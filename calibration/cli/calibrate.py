"""`cats-calibrate`: make CATS thresholds files for a model (see calibration/README.md).

    cats-calibrate --model SmolLM2-135M-Instruct --sparsity 0.3 0.5 --mode both --out DIR

Loads the model with the server's own loader, then hands it to cats_serve.calibration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from cats_serve.calibration.allocate import SENSITIVITY_GRID
from cats_serve.calibration.calibrate import CalibrationConfig, calibrate, file_name
from cats_serve.calibration.cli.model_args import load_from_args, model_parser
from cats_serve.calibration.text_data import BUILTIN_SOURCES, TextDataError
from cats_serve.calibration.thresholds_file import CRITERIA, MODES, save_thresholds
from cats_serve.calibration.two_threshold import SPLITS


def build_parser() -> argparse.ArgumentParser:
    parser = model_parser("cats-calibrate", "Calibrate CATS thresholds files for a model.")
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
    parser.add_argument(
        "--two-threshold",
        action="store_true",
        help="two thresholds per layer: t_up on the CATS score for the W_up rows, t_down on "
        "|SiLU(gate) * up| for the W_down rows; the level is then the fraction of W_up and "
        "W_down rows not read (files named *-two-*)",
    )
    parser.add_argument(
        "--split",
        type=float,
        default=None,
        help="two-threshold: a layer at row sparsity r drops r - SPLIT of its W_up rows and "
        f"r + SPLIT of its W_down rows (default: per level, the one of {list(SPLITS)} with "
        "the least search objective)",
    )
    parser.add_argument(
        "--down-sample-tokens",
        type=int,
        default=4096,
        help="two-threshold: calibration tokens the t_down quantiles are taken on",
    )
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
        two_threshold=args.two_threshold,
        split=args.split,
        down_sample_tokens=args.down_sample_tokens,
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
    loaded = load_from_args(args)
    try:
        files = calibrate(
            loaded.model, loaded.tokenizer, loaded.info(), config, progress=not args.no_progress
        )
    except TextDataError as e:  # built-in text missing, or --data not readable
        print(f"cats-calibrate: {e}", file=sys.stderr)
        return 2
    print(
        f"{'file':<48} {'mode':<10} {'target':>6} {'mean':>6} {'held-out':>8} {'KL':>8} "
        f"{'answer KL':>9}"
    )
    for f in files:
        name = file_name(f.model_name, f.mode, f.target_sparsity, f.criterion, f.two_threshold)
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
