"""Paired bootstrap of two evaluation rows (calibration/paired.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cats_serve.calibration.paired import agreement_row, paired_difference


def row(name: str, **tasks: tuple[str, str]) -> dict:
    bits = {t: {"acc": acc, "acc_norm": norm} for t, (acc, norm) in tasks.items()}
    return {"name": name, "tasks": {t: {"correct": c} for t, c in bits.items()}}


def test_identical_rows_differ_by_exactly_nothing():
    a = row("a", piqa=("1010011", "1111000"), boolq=("01", "10"))
    d = paired_difference(a, a, "acc", samples=500)
    assert d.mean == d.low == d.high == 0.0
    assert d.per_task == {"piqa": 0.0, "boolq": 0.0}


def test_difference_is_the_mean_over_tasks_and_the_interval_covers_it():
    a = row("a", piqa=("0000", "0000"), boolq=("10" * 50, "1" * 100))
    b = row("b", piqa=("1111", "0000"), boolq=("11" * 50, "1" * 100))
    acc = paired_difference(a, b, "acc", samples=2000)
    assert acc.per_task == {"piqa": 1.0, "boolq": 0.5}
    assert acc.mean == pytest.approx(0.75)
    assert acc.low < acc.mean < acc.high  # boolq's half varies across resamples
    assert acc.low > 0.6 and acc.high < 0.9
    norm = paired_difference(a, b, "acc_norm", samples=200)
    assert norm.mean == norm.low == norm.high == 0.0


def test_shared_errors_cancel_in_the_pairing():
    """B fixes 30 of A's 1,000 errors and breaks none: a clearly positive interval, although
    the two accuracies are close and each alone is uncertain by more than the gap."""
    rng = np.random.default_rng(1)
    a_bits = (rng.random(2000) < 0.5).astype(int)
    b_bits = a_bits.copy()
    b_bits[np.flatnonzero(a_bits == 0)[:30]] = 1
    bits = lambda x: "".join(map(str, x))
    a = row("a", hellaswag=(bits(a_bits), bits(a_bits)))
    b = row("b", hellaswag=(bits(b_bits), bits(b_bits)))
    d = paired_difference(a, b, "acc", samples=2000)
    assert d.mean == pytest.approx(0.015)
    assert d.low > 0.005


def test_refuses_rows_it_cannot_pair():
    a = row("a", piqa=("101", "101"))
    with pytest.raises(ValueError, match="different examples"):
        paired_difference(a, row("b", piqa=("10", "10")), "acc")
    with pytest.raises(ValueError, match="share no task"):
        paired_difference(a, row("b", boolq=("1", "1")), "acc")
    old = {"name": "old", "tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.5}}}
    with pytest.raises(ValueError, match="no per-example results"):
        paired_difference(a, old, "acc")
    with pytest.raises(ValueError, match="metric"):
        paired_difference(a, a, "f1")


def picks(name: str, **tasks: tuple[list[int], list[int]]) -> dict:
    text = lambda x: " ".join(map(str, x))  # as cats-eval writes them
    return {
        "name": name,
        "tasks": {
            t: {"choice": {"acc": text(a), "acc_norm": text(n)}} for t, (a, n) in tasks.items()
        },
    }


def test_agreement_counts_every_changed_answer():
    dense = picks("dense", piqa=([0, 1, 1, 0], [1, 1, 0, 0]), arc_easy=([3, 2, 0], [3, 2, 0]))
    # piqa acc: two answers changed; arc_easy: one wrong answer moved to another choice
    sparse = picks("s", piqa=([1, 1, 0, 0], [1, 1, 0, 0]), arc_easy=([3, 1, 0], [3, 2, 0]))
    agree = agreement_row(sparse, dense)
    assert agree["name"] == "s, same answer as dense"
    assert agree["tasks"]["piqa"]["correct"] == {"acc": "0101", "acc_norm": "1111"}
    assert agree["tasks"]["piqa"]["acc"] == 0.5 and agree["tasks"]["arc_easy"]["acc"] == 2 / 3
    assert agree["tasks"]["arc_easy"]["acc_norm"] == 1.0
    # the bootstrap compares agreement as it compares accuracy
    closer = agreement_row(dense, dense)
    d = paired_difference(agree, closer, "acc", samples=300)
    assert d.per_task == {"piqa": 0.5, "arc_easy": pytest.approx(1 / 3)}


def test_agreement_needs_choices_on_the_same_examples():
    dense = picks("dense", piqa=([0, 1], [0, 1]))
    with pytest.raises(ValueError, match="different examples"):
        agreement_row(picks("s", piqa=([0], [0])), dense)
    with pytest.raises(ValueError, match="no per-example choices"):
        agreement_row(row("old", piqa=("10", "10")), dense)
