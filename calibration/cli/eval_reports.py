"""The tables `cats-eval` prints: of one run, of earlier --out reports (--markdown), and the
paired comparison of two reports (--compare)."""

from __future__ import annotations

import json
from pathlib import Path

from cats_serve.calibration.paired import METRICS, agreement_row, paired_difference


def row_sparsity(row: dict) -> float:
    """A row's realised row sparsity (reports made before two-threshold mode kept only the
    neurons' sparsity, the same quantity for their single-threshold files)."""
    return row.get("realised_row_sparsity", row["realised_sparsity"])


def format_table(results: list[dict], tasks: list[str]) -> str:
    dense = next((r for r in results if r["name"] == "dense"), None)
    head = f"{'config':<34} {'sparsity':>8} {'ppl':>7} {'dppl%':>6}"
    head += "".join(f" {t[:9]:>9}" for t in tasks) + f" {'avg':>6} {'avg_n':>6}"
    lines = [head, "  (task cells: acc / acc_norm, %)"]
    for r in results:
        dppl = 100 * (r["perplexity"] / dense["perplexity"] - 1) if dense else float("nan")
        line = f"{r['name'][:34]:<34} {row_sparsity(r):>8.3f} {r['perplexity']:>7.2f}"
        line += f" {dppl:>+6.1f}"
        for t in tasks:
            s = r["tasks"][t]
            line += f" {100 * s['acc']:>4.1f}/{100 * s['acc_norm']:<4.1f}"
        if tasks:
            line += f" {100 * r['avg_acc']:>6.2f} {100 * r['avg_acc_norm']:>6.2f}"
        if tasks and r is not dense and has_choices(r) and has_choices(dense):
            line += f"  same answer as dense: {mean_agreement(r, dense, tasks)}"
        if "divergence" in r:
            line += "  KL vs dense: " + ", ".join(
                f"{k} {v:.4f}" for k, v in r["divergence"].items()
            )
        if "qa_accuracy" in r:
            line += "  held-out qa acc: " + ", ".join(
                f"{k} {100 * v:.1f}" for k, v in r["qa_accuracy"].items()
            )
        for answers, mean in r.get("qa_answer_prior", {}).items():
            line += f"  mean p({answers!r}): " + "/".join(f"{100 * p:.1f}" for p in mean)
        lines.append(line)
    return "\n".join(lines)


def row_file(name: str) -> str:
    """The thresholds file of a row named "mode level (file.json)", without .json."""
    return name.rsplit(" (", 1)[-1].rstrip(")").removesuffix(".json")


def markdown_table(reports: list[tuple[Path, dict]]) -> str:
    """Rows of several (path, report) pairs as markdown: dense once, then every other row
    labelled by its report's file name (without `eval-`; plus the row's thresholds file when
    a report holds several); acc_norm per task (%), averages of acc and acc_norm over the
    tasks every row with tasks has (partial runs included), and how often the row picked the
    dense row's answer (where both kept their choices)."""
    rows, dense = [], None
    for path, report in reports:
        sparse = [r for r in report["results"] if r["name"] != "dense"]
        dense = dense or next((r for r in report["results"] if r["name"] == "dense"), None)
        stem = path.stem.removeprefix("eval-")
        for r in sparse:
            label = stem if len(sparse) == 1 else f"{stem}: {row_file(r['name'])}"
            rows.append((label + (" (partial)" if r.get("partial") else ""), r))
    if dense is None:
        raise SystemExit("cats-eval: --markdown needs a report with a dense row")
    rows.insert(0, ("dense", dense))
    with_tasks = [r for _, r in rows if r["tasks"]]
    tasks = [t for t in dense["tasks"] if all(t in r["tasks"] for r in with_tasks)]
    n = len(tasks)
    head = ["config", "criterion", "realised row sparsity", "ppl", "Δppl", *tasks]
    head += [f"avg acc ({n} tasks)", f"avg acc_norm ({n} tasks)"]
    head += ["same answer as dense, avg acc / acc_norm"]
    kl = any("divergence" in r for _, r in rows)
    if kl:
        head += ["KL vs dense, tokens / answers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        criterion = "-" if label == "dense" else r.get("criterion") or "silu"
        cells = [
            label,
            criterion,
            f"{row_sparsity(r):.3f}",
            f"{r['perplexity']:.2f}",
            f"{100 * (r['perplexity'] / dense['perplexity'] - 1):+.1f}%",
        ]
        if r["tasks"] and n:
            cells += [f"{100 * r['tasks'][t]['acc_norm']:.1f}" for t in tasks]
            for metric in ("acc", "acc_norm"):
                cells.append(f"{100 * sum(r['tasks'][t][metric] for t in tasks) / n:.2f}")
            agrees = label != "dense" and has_choices(r) and has_choices(dense)
            cells.append(mean_agreement(r, dense, tasks) if agrees else "-")
        else:  # a perplexity-only run
            cells += ["not run"] * (n + 3)
        if kl:
            d = r.get("divergence")
            cells.append("-" if d is None else f"{d['tokens']:.4f} / {d['answers']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compared_row(path: Path) -> tuple[dict, dict | None]:
    """The one non-dense row of a report (else its dense row), and the report's dense row."""
    rows = json.loads(path.read_text())["results"]
    sparse = [r for r in rows if r["name"] != "dense"]
    if len(sparse) > 1:
        raise SystemExit(f"cats-eval: --compare {path}: several configurations; which one?")
    return (sparse or rows)[0], next((r for r in rows if r["name"] == "dense"), None)


def mean_agreement(row: dict, dense: dict, tasks: list[str]) -> str:
    """How often `row` picked `dense`'s answer, averaged over `tasks`: "acc / acc_norm" (%)."""
    agree = agreement_row(row, dense)["tasks"]
    return " / ".join(f"{100 * sum(agree[t][m] for t in tasks) / len(tasks):.2f}" for m in METRICS)


def has_choices(row: dict | None) -> bool:
    return row is not None and all("choice" in t for t in row["tasks"].values())


def format_comparison(a: dict, b: dict, dense: dict | None = None) -> str:
    """B - A on accuracy; and on agreement with `dense` when every row kept its choices."""
    lines = [f"B - A, points (95% paired bootstrap interval)\nA: {a['name']}\nB: {b['name']}"]
    pairs = [("", a, b)]
    if all(has_choices(r) for r in (a, b, dense)) and dense not in (a, b):
        pairs.append(("same answer as dense, ", agreement_row(a, dense), agreement_row(b, dense)))
    for label, x, y in pairs:
        for metric in METRICS:
            d = paired_difference(x, y, metric)
            cells = " ".join(f"{t}={100 * v:+.1f}" for t, v in d.per_task.items())
            lines.append(
                f"{label}{metric:<8} avg {100 * d.mean:+.2f} [{100 * d.low:+.2f}, "
                f"{100 * d.high:+.2f}]  per task: {cells}"
            )
    return "\n".join(lines)
