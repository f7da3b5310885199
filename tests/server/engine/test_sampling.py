"""pick_tokens / read_picks and RowSampler: greedy, temperature, top-k, top-p, penalties,
seeds, and the logprobs reported with each token."""

from __future__ import annotations

import math

import pytest
import torch

from cats_serve.server.engine.sampling import (
    RowSampler,
    SamplingParams,
    pick_tokens,
    read_picks,
    top_logprobs,
)

CPU = torch.device("cpu")


def sample_rows(logits: torch.Tensor, rows: list[RowSampler]):
    """Pick on the device, then read: what the engine does for a step's rows."""
    return read_picks(pick_tokens(logits, rows))


def sampler(**params) -> RowSampler:
    return RowSampler.create(SamplingParams(**params), CPU)


def draws(row: RowSampler, logits: torch.Tensor, n: int) -> list[int]:
    return [sample_rows(logits[None], [row])[0][0] for _ in range(n)]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(50, generator=torch.Generator().manual_seed(0))


def test_greedy_rows_take_the_argmax(logits):
    batch = torch.stack([logits, -logits])
    tokens, logprobs = sample_rows(batch, [sampler(temperature=0.0), sampler(temperature=0.0)])
    assert tokens == [int(logits.argmax()), int((-logits).argmax())]
    assert logprobs == [None, None]


def test_the_same_seed_gives_the_same_tokens(logits):
    first = draws(sampler(temperature=1.0, seed=7), logits, 40)
    again = draws(sampler(temperature=1.0, seed=7), logits, 40)
    other = draws(sampler(temperature=1.0, seed=8), logits, 40)
    assert first == again
    assert first != other


def test_greedy_and_sampled_rows_share_a_batch(logits):
    rows = [sampler(temperature=0.0), sampler(temperature=1.0, seed=3), sampler(temperature=0.0)]
    tokens, _ = sample_rows(torch.stack([logits] * 3), rows)
    alone = draws(sampler(temperature=1.0, seed=3), logits, 1)
    assert tokens[0] == tokens[2] == int(logits.argmax())
    assert tokens[1] == alone[0]  # a row's draws do not depend on its neighbours


def test_top_k_one_is_greedy_at_any_temperature(logits):
    assert set(draws(sampler(temperature=2.0, top_k=1, seed=0), logits, 30)) == {
        int(logits.argmax())
    }


def test_top_k_keeps_only_the_k_best(logits):
    best = set(logits.topk(3).indices.tolist())
    seen = set(draws(sampler(temperature=5.0, top_k=3, seed=1), logits, 200))
    assert seen == best  # a high temperature reaches all three, never a fourth


def test_top_k_beyond_the_vocabulary_cuts_nothing(logits):
    flat = torch.zeros(4)
    assert set(draws(sampler(temperature=1.0, top_k=99, seed=2), flat, 200)) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()
    # 0.5 alone reaches top_p = 0.5: only the best token is ever drawn
    assert set(draws(sampler(temperature=1.0, top_p=0.5, seed=0), logits, 100)) == {0}
    # 0.51 needs the second token too, never the third
    assert set(draws(sampler(temperature=1.0, top_p=0.51, seed=0), logits, 300)) == {0, 1}


def test_a_tiny_top_p_still_keeps_the_best_token(logits):
    assert set(draws(sampler(temperature=1.0, top_p=1e-9, seed=0), logits, 20)) == {
        int(logits.argmax())
    }


def test_presence_penalty_moves_greedy_off_a_repeated_token():
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    row = sampler(temperature=0.0, presence_penalty=1.0)
    # 3.0 -> 2.0 once token 1 is used, below 2.5; then 2.5 -> 1.5, and token 1 leads again for
    # good: the presence penalty is paid once, whatever the count
    assert draws(row, logits, 4) == [1, 2, 1, 1]


def test_frequency_penalty_grows_with_the_count():
    logits = torch.tensor([0.0, 2.0])
    row = sampler(temperature=0.0, frequency_penalty=0.5)
    # token 1 leads by 2.0 and loses 0.5 per use: picked 4 times, then token 0 (tie -> first)
    assert draws(row, logits, 5) == [1, 1, 1, 1, 0]


def test_no_penalty_before_the_first_token(logits):
    row = sampler(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    assert draws(row, logits, 1) == [int(logits.argmax())]


def test_logprobs_of_the_chosen_token_and_the_best_alternatives(logits):
    batch = torch.stack([logits, logits, logits])
    rows = [sampler(temperature=0.0, logprobs=3), sampler(temperature=0.0), sampler(logprobs=0)]
    tokens, logprobs = sample_rows(batch, rows)
    logp = torch.log_softmax(logits, -1)
    first = logprobs[0]
    assert first.token_id == tokens[0]
    assert math.isclose(first.logprob, float(logp[tokens[0]]), rel_tol=1e-6)
    assert [t for t, _ in first.top] == logp.topk(3).indices.tolist()
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True)
    assert logprobs[1] is None  # this row did not ask
    assert logprobs[2].top == []  # logprobs=0: the chosen token only
    assert math.isclose(logprobs[2].logprob, float(logp[tokens[2]]), rel_tol=1e-6)


def test_top_logprobs_of_given_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = top_logprobs(logits, torch.tensor([0, 0]), k=2)
    logp = torch.log_softmax(logits, -1)
    assert [o.token_id for o in out] == [0, 0]
    assert torch.allclose(torch.tensor([o.logprob for o in out]), logp[:, 0])
    assert [t for t, _ in out[0].top] == [2, 1]
    assert out[1].top[0][0] == 0
    assert top_logprobs(logits, torch.tensor([1, 2]), k=0)[0].top == []


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_is_greedy_and_never_nan(logits, temperature):
    row = sampler(temperature=temperature, seed=0)
    assert set(draws(row, logits, 10)) == {int(logits.argmax())}


def test_a_row_with_broken_logits_takes_its_best_token_and_spares_its_neighbours(logits):
    broken = logits.clone()
    broken[3] = torch.nan
    rows = [sampler(temperature=1.0, seed=1), sampler(temperature=1.0, seed=2)]
    tokens, _ = sample_rows(torch.stack([broken, logits]), rows)
    alone = draws(sampler(temperature=1.0, seed=2), logits, 1)
    assert tokens[1] == alone[0]
    assert 0 <= tokens[0] < logits.numel()
