"""Per-layer histograms of the CATS score and the quantiles CATS takes its thresholds from.

The score of neuron i is |SiLU(gate_i)|, times the neuron's weight s_i under the "up_rms"
criterion (see thresholds_file.py).

Fixed-width bins over [0, max_value) plus one overflow bin. With the defaults (40,000 bins of
width 1e-4 over [0, 4)) a quantile is exact up to 1e-4 in t before interpolation; inside a bin
the values are taken as uniformly spread, so the error is far smaller in practice. The paper
used 0.002-wide bins. A quantile that falls into the overflow bin raises (widen the range).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_BINS = 40_000
DEFAULT_MAX_VALUE = 4.0


class ActivationHistogram:
    """Counts of |SiLU(h @ W_gate^T)| per layer: counts [L, bins + 1] int64 (last = overflow)."""

    def __init__(self, num_layers: int, bins: int = DEFAULT_BINS, max_value=DEFAULT_MAX_VALUE):
        if bins < 1 or max_value <= 0:
            raise ValueError(f"need bins >= 1 and max_value > 0, got {bins}, {max_value}")
        self.bins = bins
        self.max_value = float(max_value)
        self.bin_width = self.max_value / bins
        self.counts = torch.zeros(num_layers, bins + 1, dtype=torch.int64)
        self.token_counts = torch.zeros(num_layers, dtype=torch.int64)

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    def tokens(self, layer: int = 0) -> int:
        """Token positions histogrammed for `layer`."""
        return int(self.token_counts[layer])

    def add(
        self,
        layer: int,
        h: torch.Tensor,
        w_gate: torch.Tensor,
        neuron_scale: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: h [N, H] normed MLP inputs at real positions; w_gate [I, H];
        neuron_scale: the criterion's per-neuron weights [I] float32, or None."""
        g = F.silu((h @ w_gate.t()).float()).abs()  # [N, I]
        self.add_values(layer, g if neuron_scale is None else g * neuron_scale)

    def add_values(self, layer: int, values: torch.Tensor) -> None:
        """Add scores [N, I] (|SiLU(gate)|, weighted or not; non-negative) of one layer."""
        if values.dim() != 2:
            raise ValueError(f"values must be [N, I], got shape {tuple(values.shape)}")
        self.token_counts[layer] += values.shape[0]
        idx = (values.reshape(-1) / self.bin_width).long().clamp_(max=self.bins)
        self.counts[layer] += torch.bincount(idx.cpu(), minlength=self.bins + 1)

    def quantile(self, layer: int, q: float) -> float:
        """The threshold t with a fraction q of this layer's values at or below it."""
        if not 0.0 <= q < 1.0:
            raise ValueError(f"quantile must be in [0, 1), got {q}")
        counts = self.counts[layer].double()
        total = counts.sum().item()
        if total == 0:
            raise ValueError(f"layer {layer} has an empty histogram (no tokens seen)")
        if q == 0.0:
            return 0.0
        target = q * total
        cum = counts.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
        if b >= self.bins:
            raise ValueError(
                f"layer {layer}: quantile {q} lies above the histogram range "
                f"[0, {self.max_value}); raise max_value"
            )
        below = cum[b - 1].item() if b > 0 else 0.0
        inside = (target - below) / counts[b].item()
        return (b + inside) * self.bin_width

    def fraction_below(self, layer: int, t: float) -> float:
        """The fraction of this layer's values <= t (the sparsity threshold t gives here)."""
        counts = self.counts[layer].double()
        total = counts.sum().item()
        pos = t / self.bin_width
        if pos >= self.bins:
            return counts[: self.bins].sum().item() / total
        b = int(pos)
        return (counts[:b].sum().item() + counts[b].item() * (pos - b)) / total
