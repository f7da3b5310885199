"""Two-threshold calibration: a (t_up, t_down) pair per layer for a target row sparsity.

Row sparsity r is the fraction of a layer's W_up and W_down rows a token does not need
(thresholds_file.py). With a split d, a layer at r drops u = r - d of its neurons' W_up rows
(t_up: the u-quantile of the CATS score, from the histograms single-threshold calibration
uses) and r + d of their W_down rows: t_down is the (r + d)-quantile of |a_i| =
|SiLU(gate_i) * up_i| over the neurons, counted as 0 where t_up drops the neuron, on a sample
of the dense model's MLP inputs (the first `tokens` calibration tokens). d = 0 is
single-threshold CATS. Near the ends u is clipped at 0 and r + d at MAX_DOWN_SPARSITY, the split
shrinking to fit (mean row sparsity is kept exactly).

The score on the down side is |a_i| unweighted: weighting it by ||W_down[:, i]|| (what neuron i
adds to the output is a_i * W_down[:, i]) was measured with probe_split.py in
calibration/results/two-threshold-probe/ and is reported in calibration/README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cats_serve.calibration.histogram import ActivationHistogram
from cats_serve.calibration.scoring import dense_passes
from cats_serve.calibration.text_data import TokenBatch

SPLITS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # the d cats-calibrate chooses from
MAX_DOWN_SPARSITY = 0.99


class DownSamples:
    """Per layer, the CATS score and |a| of every neuron on a sample of calibration tokens
    (dense model): two float32 [tokens, I] tensors per layer, on the model's device."""

    def __init__(self, model, batches: list[TokenBatch], tokens: int, *, progress: bool = True):
        n = model.config.num_layers
        self.score: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.down: list[list[torch.Tensor]] = [[] for _ in range(n)]
        seen = [0] * n

        def on_mlp_input(layer: int, h: torch.Tensor) -> None:  # h: [N_real, H]
            h = h[: tokens - seen[layer]]
            if h.shape[0] == 0:
                return
            seen[layer] += h.shape[0]
            w = model.layers[layer]
            g = F.silu(h.float() @ w.w_gate.float().t())
            s = g.abs() if w.neuron_scale is None else g.abs() * w.neuron_scale
            self.score[layer].append(s)
            self.down[layer].append((g * (h.float() @ w.w_up.float().t())).abs())

        needed, covered = [], 0  # the first batches that hold `tokens` real tokens
        for batch in batches:
            if covered >= tokens:
                break
            needed.append(batch)
            covered += batch.num_real
        dense_passes(model, needed, on_mlp_input, desc="down samples", progress=progress)
        if min(seen) == 0:
            raise ValueError("no calibration tokens to sample the down projection's inputs on")
        self.tokens = min(seen)
        self.score = [torch.cat(x).flatten() for x in self.score]
        self.down = [torch.cat(x).flatten() for x in self.down]

    def down_threshold(self, layer: int, t_up: float, down_sparsity: float) -> float:
        """t_down with a fraction `down_sparsity` of the sampled neurons' W_down rows not
        needed, neurons under t_up counted as not needing theirs."""
        second = torch.where(self.score[layer] > t_up, self.down[layer], 0.0)
        k = min(second.numel(), max(1, round(down_sparsity * second.numel())))
        return float(second.kthvalue(k).values)


def split_sparsities(row_sparsity: float, split: float) -> tuple[float, float]:
    """(u, r_down): the fractions of W_up and W_down rows not needed for row sparsity r and
    split d, with u = r - d >= 0 and r_down = r + d <= MAX_DOWN_SPARSITY (d shrinks to fit)."""
    d = min(split, row_sparsity, MAX_DOWN_SPARSITY - row_sparsity)
    d = max(d, 0.0)
    return row_sparsity - d, row_sparsity + d


class TwoThresholdQuantiles:
    """`quantile(layer, r)` -> the (t_up, t_down) pair of row sparsity r under one split: the
    interface of ActivationHistogram that allocate.py's searches use, so the allocated mode
    spreads row sparsity over layers the same way it spreads single-threshold sparsity."""

    def __init__(self, hist: ActivationHistogram, samples: DownSamples, split: float):
        self.hist, self.samples, self.split = hist, samples, split

    @property
    def num_layers(self) -> int:
        return self.hist.num_layers

    def up_sparsity(self, row_sparsity: float) -> float:
        return split_sparsities(row_sparsity, self.split)[0]

    def quantile(self, layer: int, row_sparsity: float) -> tuple[float, float]:
        up, down = split_sparsities(row_sparsity, self.split)
        t_up = self.hist.quantile(layer, up)
        if down <= up:
            return t_up, 0.0
        return t_up, self.samples.down_threshold(layer, t_up, down)
