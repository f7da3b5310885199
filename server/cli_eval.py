"""`cats-eval`: offline quality of a model dense and under each thresholds file.

    cats-eval --thresholds a.json b.json --limit 300 --out results.json

Perplexity on held-out built-in text (LAMBADA passages never used for calibration) with the
realised per-layer sparsity, and zero-shot log-likelihood multiple choice (acc, acc_norm) on
the CATS paper's 8 tasks. Prints a table; writes every figure to --out as JSON, rewritten
after each configuration so a long run leaves partial results behind.
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

from cats_serve.calibration.evaluate import score_choices
from cats_serve.calibration.scoring import score_text
from cats_serve.calibration.tasks import TASK_VARIANT, TASKS, load_task
from cats_serve.calibration.text_data import load_documents, pack_documents, pad_batches
from cats_serve.calibration.thresholds_file import load_thresholds
from cats_serve.server.cli_calibrate import add_model_args, load_for_quality
from cats_serve.server.settings import default_cache_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cats-eval", description="Perplexity and zero-shot accuracy, dense vs CATS files."
    )
    add_model_args(parser)
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
        "--reuse-dense",
        type=Path,
        default=None,
        help="take the dense row from an earlier --out JSON of the same model and settings",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument(
        "--markdown",
        type=Path,
        nargs="+",
        default=None,
        help="print a markdown table of earlier --out reports (no model is loaded) and exit",
    )
    return parser


def evaluate_config(
    loaded, name, thresholds, ppl_batches, tasks, args, progress, on_update=lambda r: None
) -> dict:
    """One configuration's row; `on_update(row)` runs after each task (partial rows saved)."""
    start = time.monotonic()
    text = score_text(loaded.model, ppl_batches, thresholds, progress=progress, desc=f"{name} ppl")
    result = {
        "name": name,
        "perplexity": text.perplexity,
        "ppl_tokens": text.predicted,
        "realised_sparsity": text.mean_sparsity,
        "realised_layer_sparsity": text.layer_sparsity,
        "tasks": {},
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
        }
        on_update(result)
    if tasks:
        result["avg_acc"] = sum(t["acc"] for t in result["tasks"].values()) / len(tasks)
        result["avg_acc_norm"] = sum(t["acc_norm"] for t in result["tasks"].values()) / len(tasks)
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


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


def format_table(results: list[dict], tasks: list[str]) -> str:
    dense = next((r for r in results if r["name"] == "dense"), None)
    head = f"{'config':<34} {'sparsity':>8} {'ppl':>7} {'dppl%':>6}"
    head += "".join(f" {t[:9]:>9}" for t in tasks) + f" {'avg':>6} {'avg_n':>6}"
    lines = [head, "  (task cells: acc / acc_norm, %)"]
    for r in results:
        dppl = 100 * (r["perplexity"] / dense["perplexity"] - 1) if dense else float("nan")
        line = f"{r['name'][:34]:<34} {r['realised_sparsity']:>8.3f} {r['perplexity']:>7.2f}"
        line += f" {dppl:>+6.1f}"
        for t in tasks:
            s = r["tasks"][t]
            line += f" {100 * s['acc']:>4.1f}/{100 * s['acc_norm']:<4.1f}"
        if tasks:
            line += f" {100 * r['avg_acc']:>6.2f} {100 * r['avg_acc_norm']:>6.2f}"
        lines.append(line)
    return "\n".join(lines)


def markdown_table(reports: list[dict]) -> str:
    """Rows of several reports (dense once) as markdown: acc_norm per task (%), and averages
    of acc and acc_norm over the tasks every row with tasks has (partial runs included)."""
    rows, seen = [], set()
    for report in reports:
        for r in report["results"]:
            if r["name"] not in seen:
                seen.add(r["name"])
                rows.append(r)
    dense = next(r for r in rows if r["name"] == "dense")
    with_tasks = [r for r in rows if r["tasks"]]
    tasks = [t for t in dense["tasks"] if all(t in r["tasks"] for r in with_tasks)]
    n = len(tasks)
    head = ["config", "realised sparsity", "ppl", "Δppl", *tasks]
    head += [f"avg acc ({n} tasks)", f"avg acc_norm ({n} tasks)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["name"].split(" (")[0] + (" (partial)" if r.get("partial") else ""),
            f"{r['realised_sparsity']:.3f}",
            f"{r['perplexity']:.2f}",
            f"{100 * (r['perplexity'] / dense['perplexity'] - 1):+.1f}%",
        ]
        if r["tasks"] and n:
            cells += [f"{100 * r['tasks'][t]['acc_norm']:.1f}" for t in tasks]
            for metric in ("acc", "acc_norm"):
                cells.append(f"{100 * sum(r['tasks'][t][metric] for t in tasks) / n:.2f}")
        else:  # a perplexity-only run
            cells += ["not run"] * (n + 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.markdown:
        print(markdown_table([json.loads(p.read_text()) for p in args.markdown]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        print(f"cats-eval: unknown task(s) {unknown}; known: {' '.join(TASKS)}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    loaded = load_for_quality(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir or default_cache_dir(),
    )
    c = loaded.model.config
    files = [
        load_thresholds(
            p,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            fingerprint=loaded.info.fingerprint,
        )
        for p in args.thresholds
    ]
    held = load_documents("lambada", "heldout")
    windows, docs_used = pack_documents(
        loaded.tokenizer, held.texts, seq_len=args.seq_len, max_tokens=args.ppl_tokens
    )
    ppl_batches = list(pad_batches(windows, args.batch_tokens))
    tasks = {t: load_task(t, args.limit) for t in args.tasks}

    report_settings = {
        "model": vars(loaded.info),
        "device": str(loaded.model.device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "perplexity_text": f"{held.source}: {docs_used} documents in {args.seq_len}-token windows",
        "tasks": {t: {"variant": TASK_VARIANT, "examples": len(e)} for t, e in tasks.items()},
        "limit": args.limit,
    }
    reuse = None if args.reuse_dense is None else reused_dense(args.reuse_dense, report_settings)
    configs = [] if args.no_dense or reuse else [("dense", [0.0] * c.num_layers)]
    report = dict(report_settings, results=[reuse] if reuse else [])
    configs += [(f"{f.mode} {f.target_sparsity:.2f} ({f.path.name})", f.thresholds) for f in files]

    def save(partial: dict | None = None) -> None:
        if args.out:
            rows = report["results"] + ([dict(partial, partial=True)] if partial else [])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(report, results=rows), indent=1) + "\n")

    for name, thresholds in configs:
        row = evaluate_config(
            loaded, name, thresholds, ppl_batches, tasks, args, progress, on_update=save
        )
        report["results"].append(row)
        save()
    print(format_table(report["results"], list(tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
