"""Allocated CATS: the same mean MLP sparsity, spread over layers where it costs least.

Objective: divergences of the sparse model from the dense one on calibration data. Always the
token KL, KL(p_dense || p_cats) of the next-token distributions averaged over the real tokens
of calibration text (`TokenKL`); optionally also the answer KL of answer_kl.py on
multiple-choice questions. With several divergences, each is divided by its value under
uniform CATS at the same level, and the objective is their sum (uniform scores the number of
divergences; every divergence counts alike whatever its scale). Three steps:

1. Sensitivity: for every layer l and sparsity s on a grid, sparsify layer l alone (threshold =
   its s-quantile, every other layer dense) and measure the divergences: curves D_l(s), made
   non-decreasing and linearly interpolated between grid points (D_l(0) = 0).
2. Allocation: choose s_l on a 0.01 grid, 0 <= s_l <= max_sparsity, with mean_l s_l = target
   exactly, minimising sum_l D_l(s_l). Under this additive model the problem is separable and
   a dynamic programme over layers solves it exactly (L x units x choices, milliseconds).

3. Joint refinement: additivity is an approximation (errors of several layers compound), so
   the DP result is refined with every layer sparse at once. Each round measures, at the
   current allocation, the joint objective after raising each layer's sparsity by `step` and
   after lowering it by `step` (2L runs), pairs the cheapest raises with the largest savings
   (disjoint pairs, predicted gain > 0), applies them and keeps the result only if the joint
   objective fell (else the single best pair, else a halved step). The mean never changes; the
   joint objective never rises.

The divergences of the result are written into the thresholds file next to uniform's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from cats_serve.calibration.histogram import ActivationHistogram
from cats_serve.calibration.pairs import threshold_tensor
from cats_serve.calibration.text_data import TokenBatch

SENSITIVITY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ALLOCATION_STEP = 0.01
REFINE_STEP = 0.05
REFINE_MIN_STEP = 0.02
REFINE_PAIRS = 4


class TokenKL:
    """Dense log-probabilities of a few batches, kept to measure KL of sparse runs against."""

    def __init__(self, model, batches: list[TokenBatch]):
        self.model = model
        self.batches = batches
        n = model.config.num_layers
        dense = torch.zeros(n, dtype=torch.float32, device=model.device)
        with torch.inference_mode():
            self.logp = [self._logp(b, dense) for b in batches]  # each [N_real, V]

    def _logp(self, batch: TokenBatch, thresholds: torch.Tensor) -> torch.Tensor:
        tokens, real = batch.tokens.to(self.model.device), batch.real.to(self.model.device)
        logits = self.model.score(tokens, real, thresholds)  # [B, T, V]
        return torch.log_softmax(logits[real].float(), dim=-1)

    @property
    def tokens(self) -> int:
        return sum(b.num_real for b in self.batches)

    def kl(self, thresholds) -> float:
        """Mean over real tokens of KL(dense || model under `thresholds`, one value or
        (t_up, t_down) pair per layer)."""
        t = threshold_tensor(thresholds, self.model.config.num_layers, self.model.device)
        total, count = 0.0, 0
        with torch.inference_mode():
            for batch, ref in zip(self.batches, self.logp, strict=True):
                logp = self._logp(batch, t)
                total += float((ref.exp() * (ref - logp)).sum())
                count += ref.shape[0]
        return total / max(count, 1)


class SearchObjective:
    """Named divergences (objects with `kl(thresholds) -> float`) measured together."""

    def __init__(self, parts: dict):
        self.parts = parts

    @property
    def names(self) -> list[str]:
        return list(self.parts)

    def measure(self, thresholds) -> np.ndarray:
        """Every divergence under `thresholds` [L], in the order of `names`."""
        return np.array([part.kl(thresholds) for part in self.parts.values()])

    def weights(self, uniform: np.ndarray) -> np.ndarray:
        """1 for a single divergence; else each divided by its value under uniform CATS."""
        if len(uniform) == 1:
            return np.ones(1)
        return 1.0 / np.maximum(uniform, 1e-12)


def layer_sensitivity(
    measure: Callable[[list[float]], np.ndarray],
    hist: ActivationHistogram,
    grid: tuple[float, ...] = SENSITIVITY_GRID,
    *,
    progress: bool = True,
) -> np.ndarray:
    """Divergence curves [L, len(grid), P]: layer l alone at each grid sparsity, all others
    dense; `measure(thresholds)` gives the P divergences."""
    n = hist.num_layers
    rows = []
    steps = tqdm(total=n * len(grid), desc="layer sensitivity", unit="run", disable=not progress)
    for layer in range(n):
        row = []
        for s in grid:
            t = [0.0] * n
            t[layer] = hist.quantile(layer, s)
            row.append(np.atleast_1d(measure(t)))
            steps.update()
        rows.append(row)
    steps.close()
    return np.asarray(rows, dtype=np.float64)


def allocate_sparsity(
    curves: np.ndarray,
    grid: tuple[float, ...],
    target: float,
    *,
    step: float = ALLOCATION_STEP,
    max_sparsity: float | None = None,
) -> list[float]:
    """Per-layer sparsities with mean exactly `target` (on the `step` grid) minimising sum D_l.

    curves: [L, len(grid)] costs at the grid sparsities (cost at 0 is taken as 0).
    """
    curves = np.asarray(curves, dtype=np.float64)
    n_layers = curves.shape[0]
    cap = grid[-1] if max_sparsity is None else max_sparsity
    max_units = round(cap / step)
    total_units = round(target * n_layers / step)
    if not 0 <= total_units <= max_units * n_layers:
        raise ValueError(f"target sparsity {target} is outside [0, {cap}]")
    xs = np.concatenate([[0.0], np.asarray(grid, dtype=np.float64)])
    units = np.arange(max_units + 1) * step
    # cost[l, u]: interpolated, non-decreasing in u (KL measurements are noisy at low s)
    cost = np.stack(
        [np.maximum.accumulate(np.interp(units, xs, np.concatenate([[0.0], c]))) for c in curves]
    )
    best = np.full(total_units + 1, np.inf)  # best[u]: least cost of the layers so far using u
    best[0] = 0.0
    choice = np.zeros((n_layers, total_units + 1), dtype=np.int64)
    for layer in range(n_layers):
        new = np.full_like(best, np.inf)
        for k in range(min(max_units, total_units) + 1):
            cand = np.full_like(best, np.inf)
            cand[k:] = best[: total_units + 1 - k] + cost[layer, k]
            better = cand < new
            new[better] = cand[better]
            choice[layer, better] = k
        best = new
    alloc = []
    u = total_units
    for layer in reversed(range(n_layers)):
        k = int(choice[layer, u])
        alloc.append(k * step)
        u -= k
    return [round(s, 6) for s in reversed(alloc)]


def refine_allocation(
    cost: Callable[[list[float]], float],
    hist: ActivationHistogram,
    sparsity: list[float],
    *,
    rounds: int,
    step: float = REFINE_STEP,
    max_sparsity: float = SENSITIVITY_GRID[-1],
    pairs: int = REFINE_PAIRS,
    progress: bool = True,
) -> tuple[list[float], list[float]]:
    """Joint greedy exchange (step 3 above): `cost(thresholds)` is the joint objective.
    Returns the allocation and the objective per round."""
    alloc = np.asarray(sparsity, dtype=np.float64)
    n = len(alloc)

    def joint(a: np.ndarray) -> float:
        return cost([hist.quantile(layer, float(s)) for layer, s in enumerate(a)])

    def moved(a: np.ndarray, moves: list[tuple[int, int]], size: float) -> np.ndarray:
        out = a.copy()
        for up, down in moves:
            out[up] += size
            out[down] -= size
        return np.round(out, 6)

    current = joint(alloc)
    history = [current]
    bar = tqdm(total=rounds, desc="joint refinement", unit="round", disable=not progress)
    for _ in range(rounds):
        eye = np.eye(n) * step
        raise_cost = np.array(
            [joint(alloc + eye[i]) - current if alloc[i] + step <= max_sparsity + 1e-9
             else np.inf for i in range(n)]
        )  # fmt: skip
        lower_saving = np.array(
            [current - joint(alloc - eye[i]) if alloc[i] - step >= -1e-9
             else -np.inf for i in range(n)]
        )  # fmt: skip
        moves: list[tuple[int, int]] = []
        used: set[int] = set()
        for up in (int(u) for u in np.argsort(raise_cost)):
            if len(moves) == pairs or not np.isfinite(raise_cost[up]):
                break
            if up in used:
                continue
            downs = (int(d) for d in np.argsort(-lower_saving) if d != up and d not in used)
            down = next((d for d in downs if np.isfinite(lower_saving[d])), None)
            if down is None or raise_cost[up] - lower_saving[down] >= 0:
                break
            moves.append((up, down))
            used.update((up, down))
        accepted = False
        for tried in (moves, moves[:1]) if len(moves) > 1 else (moves,):
            if not tried:
                break
            candidate = moved(alloc, tried, step)
            value = joint(candidate)
            if value < current:
                alloc, current, accepted = candidate, value, True
                break
        history.append(current)
        bar.update()
        if not accepted:
            step /= 2
            if step < REFINE_MIN_STEP:
                break
    bar.close()
    return [round(float(s), 6) for s in alloc], history
