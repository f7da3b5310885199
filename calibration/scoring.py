"""Running a model over token batches: activation histograms, log-likelihoods, realised sparsity.

The model is duck-typed (the server's `LlamaModel`): `model.config.num_layers`,
`model.config.intermediate_size`, `model.layers[i].w_gate` [I, H], `model.device` and
`model.score(tokens, real, thresholds, *, on_mlp_input=None, active_count=None)`.
Only real (non-padding) positions ever reach a histogram or a count: `score` hands the hook
the MLP inputs at real positions only and never counts padding as active.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cats_serve.calibration.histogram import ActivationHistogram
from cats_serve.calibration.pairs import threshold_tensor
from cats_serve.calibration.text_data import TokenBatch


def _thresholds(model, thresholds) -> torch.Tensor:
    return threshold_tensor(thresholds, model.config.num_layers, model.device)


def dense_passes(model, batches: list[TokenBatch], on_mlp_input, *, desc: str, progress: bool):
    """Run the dense model over `batches`, handing each layer's MLP input to the hook."""
    dense = _thresholds(model, None)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            tokens, real = batch.tokens.to(model.device), batch.real.to(model.device)
            model.score(tokens, real, dense, on_mlp_input=on_mlp_input)


def collect_up_rms(model, batches: list[TokenBatch], *, progress: bool = True) -> torch.Tensor:
    """Root mean square of each neuron's up projection, dense model, real tokens: [L, I] fp32."""
    c = model.config
    sq = torch.zeros(c.num_layers, c.intermediate_size, dtype=torch.float64, device=model.device)
    tokens = 0

    def on_mlp_input(layer: int, h: torch.Tensor) -> None:  # h: [N_real, H]
        nonlocal tokens
        sq[layer] += ((h @ model.layers[layer].w_up.t()).double() ** 2).sum(0)
        if layer == 0:
            tokens += h.shape[0]

    dense_passes(model, batches, on_mlp_input, desc="up-projection RMS", progress=progress)
    if tokens == 0:
        raise ValueError("no calibration tokens to measure the up projections on")
    return (sq / tokens).sqrt().float().cpu()


def collect_histograms(
    model,
    batches: list[TokenBatch],
    hist: ActivationHistogram,
    *,
    progress: bool = True,
) -> ActivationHistogram:
    """Histogram the CATS score of the dense model per layer over the real tokens of `batches`:
    |SiLU(gate)|, times the layer's `neuron_scale` where the model has one."""

    def on_mlp_input(layer: int, h: torch.Tensor) -> None:  # h: [N_real, H]
        w = model.layers[layer]
        hist.add(layer, h, w.w_gate, w.neuron_scale)

    dense_passes(model, batches, on_mlp_input, desc="histograms", progress=progress)
    return hist


@dataclass
class TextScore:
    nll: float  # summed negative log-likelihood of predicted tokens
    predicted: int  # tokens predicted (real tokens after the first of each row)
    real_tokens: int  # real tokens run through the MLPs (sparsity denominator)
    layer_sparsity: list[float]  # fraction of inactive neurons per layer over real tokens
    layer_row_sparsity: list[float]  # fraction of W_up and W_down rows not needed, per layer

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll / max(self.predicted, 1)).exp())

    @property
    def mean_sparsity(self) -> float:
        return sum(self.layer_sparsity) / len(self.layer_sparsity)

    @property
    def mean_row_sparsity(self) -> float:
        return sum(self.layer_row_sparsity) / len(self.layer_row_sparsity)


def score_text(
    model,
    batches: Iterable[TokenBatch],
    thresholds=None,
    *,
    progress: bool = True,
    desc: str = "perplexity",
) -> TextScore:
    """Next-token NLL and realised per-layer sparsity of `model` under `thresholds` (one
    value or (t_up, t_down) pair per layer, see pairs.py)."""
    t = _thresholds(model, thresholds)
    n_layers = model.config.num_layers
    active = torch.zeros(2, n_layers, dtype=torch.int64)  # active, down-active
    nll, predicted, real_tokens = 0.0, 0, 0
    batches = list(batches)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            tokens, real = batch.tokens.to(model.device), batch.real.to(model.device)
            count = torch.zeros(2, n_layers, 1, dtype=torch.int32, device=model.device)
            logits = model.score(tokens, real, t, active_count=count)  # [B, T, V]
            active += count[:, :, 0].cpu().long()
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = tokens[:, 1:]
            mask = real[:, 1:]
            tok_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll -= float(tok_logp[mask].sum())
            predicted += int(mask.sum())
            real_tokens += batch.num_real
    neurons = real_tokens * model.config.intermediate_size
    if not neurons:
        return TextScore(nll, predicted, real_tokens, [0.0] * n_layers, [0.0] * n_layers)
    inactive = 1.0 - active.double() / neurons  # [2, L]
    return TextScore(
        nll, predicted, real_tokens, inactive[0].tolist(), inactive.mean(dim=0).tolist()
    )
