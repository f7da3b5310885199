"""Paired comparison of two evaluation rows: is B's task average really above A's?

Both rows must hold per-example results (`tasks[t]["correct"]`, written by cats-eval) on the
same examples. The statistic is the difference of the 8-task averages, mean over tasks of
(accuracy of B - accuracy of A). Its 95% interval comes from a paired bootstrap: each resample
draws, per task, as many examples as the task has, with replacement, and scores A and B on
the same draw, so what both get right or wrong together cancels out.

`agreement_row` turns a row into the same shape with "correct" meaning "picked the same choice
as the dense model" (rows keep their picks, space-separated indices, in `tasks[t]["choice"]`),
so the same bootstrap compares how close two sparse configurations stay to dense. On a small
model that is near chance on several tasks, accuracy moves with wrong answers that flip to
right as much as with right ones that flip to wrong; agreement counts every change of answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
CHUNK = 250  # resamples drawn at once
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    per_task: dict[str, float]  # accuracy of B - accuracy of A, per task
    mean: float  # difference of the task averages
    low: float  # 95% bootstrap interval of `mean`
    high: float


def _correct(row: dict, task: str, metric: str) -> np.ndarray:
    try:
        bits = row["tasks"][task]["correct"][metric]
    except KeyError as exc:
        raise ValueError(
            f"row {row['name']!r} has no per-example results for {task} (made before "
            "cats-eval kept them?)"
        ) from exc
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def paired_difference(
    a: dict, b: dict, metric: str, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> PairedDifference:
    """B - A on `metric` over the tasks both rows have (rows as in a cats-eval report)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    tasks = [t for t in a["tasks"] if t in b["tasks"]]
    if not tasks:
        raise ValueError("the two rows share no task")
    rng = np.random.default_rng(seed)
    per_task, boot = {}, np.zeros(samples)
    for task in tasks:
        ca, cb = _correct(a, task, metric), _correct(b, task, metric)
        if ca.size == 0 or ca.size != cb.size:
            raise ValueError(f"{task}: the rows were scored on different examples")
        diff = cb.astype(np.int8) - ca.astype(np.int8)
        per_task[task] = float(diff.mean())
        for lo in range(0, samples, CHUNK):  # chunks keep the index arrays small
            draws = rng.integers(0, diff.size, size=(min(CHUNK, samples - lo), diff.size))
            boot[lo : lo + draws.shape[0]] += diff[draws].mean(axis=1)
    boot /= len(tasks)
    low, high = np.percentile(boot, [2.5, 97.5])
    mean = sum(per_task.values()) / len(tasks)
    return PairedDifference(metric, per_task, mean, float(low), float(high))


def agreement_row(row: dict, dense: dict) -> dict:
    """`row` scored as agreement with `dense`: per task and metric, the fraction of examples
    (and a bit per example) where it picked the same choice as `dense`."""
    tasks = {}
    for task, scores in row["tasks"].items():
        try:
            mine, theirs = scores["choice"], dense["tasks"][task]["choice"]  # "0 3 1 ..."
        except KeyError as exc:
            raise ValueError(
                f"{task}: no per-example choices in {row['name']!r} or the dense row (made "
                "before cats-eval kept them?)"
            ) from exc
        tasks[task] = {"correct": {}}
        for metric in METRICS:
            a, b = mine[metric].split(), theirs[metric].split()
            if len(a) != len(b):
                raise ValueError(f"{task}: the rows were scored on different examples")
            same = [x == y for x, y in zip(a, b, strict=True)]
            tasks[task][metric] = sum(same) / max(len(same), 1)
            tasks[task]["correct"][metric] = "".join("1" if x else "0" for x in same)
    return {"name": f"{row['name']}, same answer as dense", "tasks": tasks}
