"""`cats-eval`: offline quality of a model dense and under each thresholds file.

    cats-eval --thresholds a.json b.json --limit 300 --out results.json

Perplexity on held-out built-in text (LAMBADA passages never used for calibration) with the
realised per-layer sparsity, zero-shot log-likelihood multiple choice (acc, acc_norm) on
the CATS paper's 8 tasks, and generative quality (calibration/generative.py: greedy
agreement with dense and short-answer accuracy, few-shot completions and chat questions).
Prints a table; writes every figure to --out as JSON, rewritten after each configuration so
a long run leaves partial results behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from cats_serve.calibration.allocate import TokenKL
from cats_serve.calibration.answer_kl import AnswerKL
from cats_serve.calibration.cli.eval_reports import (
    compared_row,
    format_comparison,
    format_table,
    markdown_table,
)
from cats_serve.calibration.cli.generation import Generative
from cats_serve.calibration.cli.model_args import load_from_args, model_parser
from cats_serve.calibration.evaluate import score_choices
from cats_serve.calibration.generative import GEN_TOKENS, SOURCES, load_prompts
from cats_serve.calibration.scoring import score_text
from cats_serve.calibration.tasks import TASK_VARIANT, TASKS, load_task, qa_questions
from cats_serve.calibration.text_data import (
    QA_SOURCES,
    TextDataError,
    load_documents,
    pack_documents,
    pad_batches,
)


def build_parser() -> argparse.ArgumentParser:
    parser = model_parser("cats-eval", "Perplexity and zero-shot accuracy, dense vs CATS files.")
    parser.add_argument("--thresholds", type=Path, nargs="*", default=[], help="files to compare")
    parser.add_argument(
        "--tasks", nargs="*", default=list(TASKS), help=f"subset of: {' '.join(TASKS)}"
    )
    parser.add_argument("--limit", type=int, default=None, help="examples per task (seeded)")
    parser.add_argument("--ppl-tokens", type=int, default=40_960, help="held-out tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per forward pass")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument(
        "--divergence",
        action="store_true",
        help="also measure each file's KL against dense: next-token KL on held-out LAMBADA "
        "text and answer KL on held-out questions of tasks that are not evaluated; every row "
        "also gets its accuracy on those questions and its mean answer distribution where "
        "questions share their answers (yes/no)",
    )
    parser.add_argument(
        "--divergence-tokens", type=int, default=4096, help="held-out tokens of --divergence"
    )
    parser.add_argument(
        "--divergence-questions", type=int, default=240, help="held-out questions of --divergence"
    )
    parser.add_argument(
        "--reuse-dense",
        type=Path,
        default=None,
        help="take the dense row from an earlier --out JSON of the same model and settings",
    )
    parser.add_argument(
        "--gen-per-source",
        type=int,
        default=100,
        help=f"generative quality: prompts per source ({len(SOURCES)} sources: "
        f"{', '.join(name for name, *_ in SOURCES)}), {GEN_TOKENS} greedy tokens each; "
        "0 skips it",
    )
    parser.add_argument(
        "--gen-batch", type=int, default=32, help="prompts generated at once (generative)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="paired bootstrap of B - A on the task averages and on agreement with the dense "
        "row's answers, from two --out reports (each report's one non-dense row, or its dense "
        "row), and exit",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        nargs="+",
        default=None,
        help="print a markdown table of earlier --out reports (no model is loaded) and exit",
    )
    return parser


def picks(choices: list[int]) -> str:
    """Per-example choice indices as one space-separated string (compact in the JSON)."""
    return " ".join(map(str, choices))


def evaluate_config(
    loaded, name, file, ppl_batches, tasks, args, progress, on_update=lambda r: None, kl=None,
    gen=None,
) -> dict:  # fmt: skip
    """One configuration's row (`file` None = dense); `on_update(row)` runs after each task
    (partial rows saved); `kl`: the references of --divergence (`divergences`): a thresholds
    file's token and answer KL against dense, and every row's accuracy and answer priors on
    those questions."""
    start = time.monotonic()
    loaded.model.set_neuron_scale(None if file is None else file.neuron_scale)
    n_layers = loaded.model.config.num_layers
    thresholds = [0.0] * n_layers if file is None else file.layer_thresholds()
    text = score_text(loaded.model, ppl_batches, thresholds, progress=progress, desc=f"{name} ppl")
    result = {
        "name": name,
        "criterion": None if file is None else file.criterion,
        "perplexity": text.perplexity,
        "ppl_tokens": text.predicted,
        "realised_sparsity": text.mean_sparsity,
        "realised_layer_sparsity": text.layer_sparsity,
        "realised_row_sparsity": text.mean_row_sparsity,
        "tasks": {},
    }
    if kl:  # one pass over the questions gives the answer KL, the accuracy and the priors
        answers = kl["answers"]
        logp = answers.dense if file is None else answers.answer_logp(thresholds)
        result["qa_accuracy"] = answers.accuracy(logp)
        result["qa_answer_prior"] = answers.priors(logp)
        if file is not None:
            result["divergence"] = {
                "tokens": kl["tokens"].kl(thresholds),
                "answers": answers.kl_of(logp),
            }
    for task, examples in tasks.items():
        score = score_choices(
            loaded.model,
            loaded.tokenizer,
            examples,
            thresholds,
            batch_tokens=2 * args.batch_tokens,
            progress=progress,
            desc=f"{name} {task}",
        )
        result["tasks"][task] = {
            "acc": score.acc,
            "acc_norm": score.acc_norm,
            "examples": score.examples,
            "correct": {"acc": score.correct, "acc_norm": score.correct_norm},
            "choice": {"acc": picks(score.choice), "acc_norm": picks(score.choice_norm)},
        }
        on_update(result)
    if tasks:
        result["avg_acc"] = sum(t["acc"] for t in result["tasks"].values()) / len(tasks)
        result["avg_acc_norm"] = sum(t["acc_norm"] for t in result["tasks"].values()) / len(tasks)
    if gen is not None:
        result["generative"] = gen.row(thresholds, name)
        on_update(result)
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


QA_SOURCE_NAMES = ", ".join(task for task, _ in QA_SOURCES)


def divergences(loaded, windows, questions, args) -> dict:
    """Dense references for --divergence: next-token KL on the first held-out perplexity
    tokens, answer KL on held-out questions (the "qa" split calibration never uses)."""
    loaded.model.set_neuron_scale(None)  # the dense model; thresholds 0 switch nothing off
    token_windows, left = [], args.divergence_tokens
    for w in windows:
        if left <= 1:
            break
        token_windows.append(w[:left])
        left -= token_windows[-1].numel()
    return {
        "tokens": TokenKL(loaded.model, list(pad_batches(token_windows, args.batch_tokens))),
        "answers": AnswerKL(
            loaded.model, loaded.tokenizer, questions, batch_tokens=args.batch_tokens
        ),
    }


COMPARED_SETTINGS = ("model", "dtype", "perplexity_text", "tasks", "limit")


def reused_dense(path: Path, settings: dict) -> dict:
    """The dense row of an earlier report, if it was measured under the same settings."""
    earlier = json.loads(path.read_text())
    for key in COMPARED_SETTINGS:
        if earlier.get(key) != settings[key]:
            raise SystemExit(
                f"cats-eval: --reuse-dense {path}: {key} differs: "
                f"expected {settings[key]!r}, found {earlier.get(key)!r}"
            )
    rows = [r for r in earlier["results"] if r["name"] == "dense"]
    if not rows:
        raise SystemExit(f"cats-eval: --reuse-dense {path} has no dense row")
    return rows[0]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        try:
            (a, dense), (b, _) = (compared_row(p) for p in args.compare)
            print(format_comparison(a, b, dense))
        except ValueError as exc:
            print(f"cats-eval: --compare: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.markdown:
        print(markdown_table([(p, json.loads(p.read_text())) for p in args.markdown]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        print(f"cats-eval: unknown task(s) {unknown}; known: {' '.join(TASKS)}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    try:  # the text and tasks first: a missing package fails before the model loads
        held = load_documents("lambada", "heldout")
        tasks = {t: load_task(t, args.limit) for t in args.tasks}
        questions = qa_questions("heldout")[: args.divergence_questions] if args.divergence else []
        prompts = load_prompts(args.gen_per_source) if args.gen_per_source > 0 else []
    except TextDataError as exc:
        print(f"cats-eval: {exc}", file=sys.stderr)
        return 2
    loaded = load_from_args(args)
    files = [loaded.load_thresholds(p) for p in args.thresholds]
    windows, docs_used = pack_documents(
        loaded.tokenizer, held.texts, seq_len=args.seq_len, max_tokens=args.ppl_tokens
    )
    ppl_batches = list(pad_batches(windows, args.batch_tokens))

    report_settings = {
        "model": vars(loaded.info()),
        "device": str(loaded.model.device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "perplexity_text": f"{held.source}: {docs_used} documents in {args.seq_len}-token windows",
        "tasks": {t: {"variant": TASK_VARIANT, "examples": len(e)} for t, e in tasks.items()},
        "limit": args.limit,
    }
    reuse = None if args.reuse_dense is None else reused_dense(args.reuse_dense, report_settings)
    configs = [] if args.no_dense or reuse else [("dense", None)]
    report = dict(report_settings, results=[reuse] if reuse else [])
    configs += [(f"{f.mode} {f.target_sparsity:.2f} ({f.path.name})", f) for f in files]

    def save(partial: dict | None = None) -> None:
        if args.out:
            rows = report["results"] + ([dict(partial, partial=True)] if partial else [])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(report, results=rows), indent=1) + "\n")

    kl = divergences(loaded, windows, questions, args) if args.divergence else None
    gen = None
    if args.gen_per_source > 0:
        gen = Generative(loaded, prompts, args, progress)
        report["generative"] = gen.describe()
        if reuse is not None:  # an earlier dense row: its generative figures are this run's
            reuse["generative"] = gen.dense_row
    if kl:
        report["divergence"] = {
            "tokens": f"{held.source}: {kl['tokens'].tokens} tokens",
            "answers": f"{kl['answers'].questions} held-out questions of {QA_SOURCE_NAMES}",
        }
    for name, file in configs:
        row = evaluate_config(loaded, name, file, ppl_batches, tasks, args, progress, save, kl, gen)
        report["results"].append(row)
        save()
    print(format_table(report["results"], list(tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
