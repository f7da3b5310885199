"""Choice log-likelihoods (batched as cats-eval runs them) and the allocated mode's answer KL,
on a tiny random model (CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from cats_serve.calibration.answer_kl import AnswerKL
from cats_serve.calibration.evaluate import choice_logliks, encode_examples
from cats_serve.calibration.tasks import Choice, Example
from cats_serve.server.model.loader import load_model

QUESTIONS = [
    Example(0, [Choice("the cat sat on", " a mat"), Choice("the cat sat on", " Paris")], 0),
    Example(
        1,
        [
            Choice("one two three four five six", " seven"),
            Choice("one two three four five six", " the dog ran to Paris and back"),
            Choice("one two three four five six", " hello"),
        ],
        2,
    ),
    Example(2, [Choice("it was", " sunny"), Choice("it was", " cold one")], 1, "weather"),
]


@pytest.fixture(scope="module")
def tiny(calib_checkpoint):
    model = load_model(calib_checkpoint, dtype=torch.float32, device="cpu").model
    return model, AutoTokenizer.from_pretrained(calib_checkpoint)


def direct_logliks(model, encoded, thresholds):
    """Reference: each choice run alone (no batch, no padding), continuation summed by hand."""
    out = []
    t = torch.tensor(thresholds, dtype=torch.float32)
    for ids, n_cont in zip(encoded.ids, encoded.n_cont, strict=True):
        tokens = torch.tensor([ids])
        with torch.inference_mode():
            logits = model.score(tokens, torch.ones_like(tokens, dtype=torch.bool), t)[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        n = len(ids)
        out.append(sum(float(logp[p - 1, ids[p]]) for p in range(n - n_cont, n)))
    return out


@pytest.mark.parametrize("batch_tokens", [8, 40, 1000])  # one per pass .. all in one padded pass
def test_choice_logliks_match_unbatched_scoring(tiny, batch_tokens):
    model, tok = tiny
    encoded = encode_examples(tok, QUESTIONS, batch_tokens=batch_tokens)
    assert encoded.example == [0, 0, 1, 1, 1, 2, 2]
    assert sorted(k for b in encoded.batches for k in b) == list(range(7))
    for thresholds in ([0.0] * 3, [0.05, 0.2, 0.1]):
        got = choice_logliks(model, encoded, thresholds, progress=False)
        assert got == pytest.approx(direct_logliks(model, encoded, thresholds), abs=1e-4)


def test_encode_keeps_the_last_tokens():
    tok_ids = {"the cat sat on a mat": list(range(1, 7)), "the cat sat on": list(range(1, 5))}

    class WordTokenizer:  # one id per word, the context a prefix of the whole
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": tok_ids[text]}

    ex = [Example(0, [Choice("the cat sat on", " a mat")], 0)]
    full = encode_examples(WordTokenizer(), ex, batch_tokens=100)
    assert full.ids == [[1, 2, 3, 4, 5, 6]] and full.n_cont == [2]
    cut = encode_examples(WordTokenizer(), ex, batch_tokens=100, max_len=3)
    assert cut.ids == [[4, 5, 6]] and cut.n_cont == [2]


def test_answer_kl_is_the_kl_of_softmax_over_choices(tiny):
    model, tok = tiny
    answers = AnswerKL(model, tok, QUESTIONS, batch_tokens=64)
    assert answers.questions == 3
    assert answers.kl([0.0] * 3) == pytest.approx(0.0, abs=1e-9)
    sparse = [0.5, 1.0, 0.8]
    encoded = encode_examples(tok, QUESTIONS, batch_tokens=64, max_len=256)
    dense_ll = direct_logliks(model, encoded, [0.0] * 3)
    sparse_ll = direct_logliks(model, encoded, sparse)
    expected = 0.0
    for q in range(3):
        rows = [k for k, e in enumerate(encoded.example) if e == q]
        p = torch.log_softmax(torch.tensor([dense_ll[k] for k in rows], dtype=torch.float64), 0)
        r = torch.log_softmax(torch.tensor([sparse_ll[k] for k in rows], dtype=torch.float64), 0)
        expected += float((p.exp() * (p - r)).sum())
    got = answers.kl(sparse)
    assert got > 1e-4  # sparsity moved the answers
    assert got == pytest.approx(expected / 3, rel=1e-3)
    with pytest.raises(ValueError, match="no questions"):
        AnswerKL(model, tok, [], batch_tokens=64)


def test_accuracy_counts_the_labelled_top_answers(tiny):
    model, tok = tiny
    answers = AnswerKL(model, tok, QUESTIONS, batch_tokens=64)
    encoded = encode_examples(tok, QUESTIONS, batch_tokens=64, max_len=256)
    for thresholds in ([0.0] * 3, [0.5, 1.0, 0.8]):
        ll = direct_logliks(model, encoded, thresholds)
        hits = []
        for q, question in enumerate(QUESTIONS):
            rows = [k for k, e in enumerate(encoded.example) if e == q]
            hits.append(max(range(len(rows)), key=lambda i: ll[rows[i]]) == question.label)
        got = answers.accuracy(answers.answer_logp(thresholds))
        assert got == {"all": sum(hits) / 3, "weather": float(hits[2])}  # only one has a source
    assert answers.accuracy(answers.dense) == answers.accuracy(answers.answer_logp([0.0] * 3))


def test_priors_average_the_answer_distributions_of_shared_answer_sets(tiny):
    model, tok = tiny
    shared = [
        Example(3, [Choice("it was", " hot"), Choice("it was", " cold")], 0),
        Example(4, [Choice("the day is", " hot"), Choice("the day is", " cold")], 1),
    ]
    answers = AnswerKL(model, tok, [*QUESTIONS, *shared], batch_tokens=64)
    for thresholds in ([0.0] * 3, [0.5, 1.0, 0.8]):
        logp = answers.answer_logp(thresholds).exp()
        # rows 7, 8 and 9, 10 are the two questions' " hot" / " cold"; questions 0-2 have answer
        # sets of their own and are left out
        expected = [float(logp[7] + logp[9]) / 2, float(logp[8] + logp[10]) / 2]
        got = answers.priors(answers.answer_logp(thresholds))
        assert list(got) == [" hot/ cold"]
        assert got[" hot/ cold"] == pytest.approx(expected, abs=1e-12)
        assert sum(got[" hot/ cold"]) == pytest.approx(1.0, abs=1e-9)
    moved = answers.priors(answers.answer_logp([0.5, 1.0, 0.8]))[" hot/ cold"]
    dense = answers.priors(answers.dense)[" hot/ cold"]
    assert abs(moved[0] - dense[0]) > 1e-4  # sparsity moved the lean
