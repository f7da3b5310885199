"""Histogram quantiles and the allocated mode's exact mean-preserving allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cats_serve.calibration.allocate import (
    SearchObjective,
    allocate_sparsity,
    layer_sensitivity,
    refine_allocation,
)
from cats_serve.calibration.histogram import ActivationHistogram


def test_quantiles_match_exact_quantiles():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4000, 37, generator=gen).abs() * 0.3  # [N, I]
    hist = ActivationHistogram(2, bins=20_000, max_value=4.0)
    hist.add_values(0, values[:1500])
    hist.add_values(0, values[1500:])  # several batches accumulate
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        exact = np.quantile(values.reshape(-1).numpy(), q)
        assert hist.quantile(0, q) == pytest.approx(exact, abs=hist.bin_width)
        assert hist.fraction_below(0, hist.quantile(0, q)) == pytest.approx(q, abs=1e-6)
    assert hist.tokens(0) == 4000 and hist.tokens(1) == 0
    assert hist.quantile(0, 0.0) == 0.0


def test_add_uses_silu_of_gate():
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(50, 6, generator=gen), torch.randn(9, 6, generator=gen)
    a, b = ActivationHistogram(1, bins=1000), ActivationHistogram(1, bins=1000)
    a.add(0, h, w)
    b.add_values(0, torch.nn.functional.silu(h @ w.t()).abs())
    assert torch.equal(a.counts, b.counts)


def test_quantile_errors():
    hist = ActivationHistogram(1, bins=10, max_value=1.0)
    with pytest.raises(ValueError, match="empty"):
        hist.quantile(0, 0.5)
    hist.add_values(0, torch.full((4, 4), 3.0))  # all above the range
    with pytest.raises(ValueError, match="above the histogram range"):
        hist.quantile(0, 0.5)
    with pytest.raises(ValueError, match="quantile"):
        hist.quantile(0, 1.0)


GRID = (0.25, 0.5, 0.75)


def test_allocation_keeps_mean_and_spares_sensitive_layers():
    # layer 0 is 10x more sensitive than layers 1 and 2
    curves = np.array([[1.0, 4.0, 9.0], [0.1, 0.4, 0.9], [0.1, 0.4, 0.9]])
    alloc = allocate_sparsity(curves, GRID, 0.5)
    assert sum(alloc) / 3 == pytest.approx(0.5, abs=1e-9)
    assert alloc[0] < alloc[1] and alloc[0] < alloc[2]
    assert max(alloc) <= GRID[-1] + 1e-9


def test_allocation_is_optimal_on_a_small_case():
    curves = np.array([[0.3, 0.5, 2.0], [0.05, 0.8, 0.9], [0.2, 0.2, 3.0]])
    step = 0.25
    alloc = allocate_sparsity(curves, GRID, 0.5, step=step)

    def cost(layer, s):
        return np.interp(s, (0.0, *GRID), (0.0, *curves[layer]))

    best = min(
        (sum(cost(i, s) for i, s in enumerate(c)), c)
        for c in itertools.product((0.0, *GRID), repeat=3)
        if abs(sum(c) - 1.5) < 1e-9
    )
    assert sum(cost(i, s) for i, s in enumerate(alloc)) == pytest.approx(best[0])


def test_allocation_rejects_unreachable_target():
    with pytest.raises(ValueError, match="outside"):
        allocate_sparsity(np.ones((2, 3)), GRID, 0.9)


class IdentityHistogram:
    """quantile(layer, s) = s: thresholds are the sparsities themselves."""

    def quantile(self, layer: int, q: float) -> float:
        return q


class InteractingCost:
    """A joint 'KL' with per-layer weights and a cross term the additive curves cannot see."""

    def __init__(self, weights, cross):
        self.weights, self.cross, self.calls = np.asarray(weights), cross, 0

    def kl(self, thresholds) -> float:
        self.calls += 1
        s = np.asarray(thresholds)
        return float((self.weights * s**2).sum() + self.cross * s[0] * s[1])


def test_refinement_lowers_joint_cost_and_keeps_mean():
    cost = InteractingCost([1.0, 1.0, 1.0, 1.0], cross=6.0)  # layers 0 and 1 compound
    start = [0.5, 0.5, 0.5, 0.5]  # what additive curves (equal weights) would give
    alloc, history = refine_allocation(
        cost.kl, IdentityHistogram(), start, rounds=20, max_sparsity=0.9, progress=False
    )
    assert sum(alloc) / 4 == pytest.approx(0.5, abs=1e-9)
    assert all(b <= a for a, b in itertools.pairwise(history))  # never rises
    assert history[-1] < 0.7 * history[0]
    assert max(alloc[0], alloc[1]) < min(alloc[2], alloc[3])  # compounding pair spared
    assert max(alloc) <= 0.9 + 1e-9 and min(alloc) >= -1e-9


def test_refinement_leaves_an_optimum_alone():
    cost = InteractingCost([1.0, 2.0, 4.0], cross=0.0)
    optimum = [round(1.5 / 1.75 * x, 6) for x in (1.0, 0.5, 0.25)]  # s_l ~ 1/w_l, mean 0.5
    alloc, history = refine_allocation(
        cost.kl, IdentityHistogram(), optimum, rounds=5, max_sparsity=0.9, progress=False
    )
    assert alloc == optimum
    assert history == [history[0]] * len(history)
    assert cost.calls <= 3 * (2 * 3 + 2)  # stopped once the step fell below the minimum


class FixedKL:
    """A divergence that is a fixed function of the thresholds."""

    def __init__(self, fn):
        self.fn = fn

    def kl(self, thresholds) -> float:
        return self.fn(np.asarray(thresholds))


class GridHistogram(IdentityHistogram):
    num_layers = 3


def test_sensitivity_measures_each_layer_alone_for_every_divergence():
    objective = SearchObjective(
        {
            "tokens": FixedKL(lambda t: float((t * [1.0, 2.0, 3.0]).sum())),
            "answers": FixedKL(lambda t: float(t.max())),
        }
    )
    curves = layer_sensitivity(objective.measure, GridHistogram(), GRID, progress=False)
    assert curves.shape == (3, len(GRID), 2)
    for layer, w in enumerate((1.0, 2.0, 3.0)):
        np.testing.assert_allclose(curves[layer, :, 0], [w * s for s in GRID])
        np.testing.assert_allclose(curves[layer, :, 1], GRID)


def test_objective_weights_make_uniform_count_each_divergence_once():
    two = SearchObjective({"tokens": FixedKL(lambda t: 0.2), "answers": FixedKL(lambda t: 0.01)})
    uniform = two.measure([0.5] * 3)
    np.testing.assert_allclose(uniform, [0.2, 0.01])
    np.testing.assert_allclose(uniform @ two.weights(uniform), 2.0)
    one = SearchObjective({"tokens": FixedKL(lambda t: 0.2)})
    assert one.names == ["tokens"]
    np.testing.assert_array_equal(one.weights(one.measure([0.5] * 3)), [1.0])  # raw KL kept


def test_weighted_allocation_follows_the_weighted_curves():
    """Layer 0 hurts tokens only, layer 1 answers only: the weights decide who is spared."""
    grid = GRID
    tokens = np.array([[4 * s for s in grid], [0.1 * s for s in grid]])
    answers = np.array([[0.001 * s for s in grid], [0.05 * s for s in grid]])
    curves = np.stack([tokens, answers], axis=-1)  # [L, G, 2]
    raw = allocate_sparsity(curves @ np.ones(2), grid, 0.5)
    assert raw[0] < raw[1]  # token KL dominates unweighted
    weighted = allocate_sparsity(curves @ np.array([1.0, 200.0]), grid, 0.5)
    assert weighted[0] > weighted[1]
