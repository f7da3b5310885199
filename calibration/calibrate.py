"""Calibration: dense run over text -> per-layer histograms -> thresholds files (both modes).

Criterion (thresholds_file.py): "silu" histograms |SiLU(gate)| as the CATS paper does;
"up_rms" first measures each neuron's up-projection RMS on the calibration text (one more
dense pass), sets those per-neuron weights on the model, and histograms the weighted score.
Everything after that (quantiles, the allocated mode's KL, held-out sparsity) runs the model
with the weights set, so it measures the criterion the file will be served with.

    uniform:   every layer at the target sparsity, t_l = its target-quantile (the CATS paper);
    allocated: per-layer sparsities from allocate.py (same mean), t_l = its s_l-quantile:
               the additive optimum of per-layer divergence curves (token KL on search text,
               plus answer KL on `search_questions` questions), then `refine_rounds` rounds of
               joint refinement with all layers sparse.

With `two_threshold`, each layer gets a (t_up, t_down) pair for its row sparsity instead
(two_threshold.py): the split between W_up and W_down rows is one per level, the one of
two_threshold.SPLITS whose uniform thresholds give the least search objective (the same
divergences on the same calibration text as the allocated mode); both modes then use it.

Each file also records the sparsity its thresholds realise on held-out text with the
thresholds applied to every layer at once (the distribution of later layers' inputs shifts
when earlier layers are sparse, so this differs a little from the calibration target).
Deterministic: documents in a fixed order, no sampling, no randomness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from cats_serve.calibration.allocate import (
    SENSITIVITY_GRID,
    SearchObjective,
    TokenKL,
    allocate_sparsity,
    layer_sensitivity,
    refine_allocation,
)
from cats_serve.calibration.answer_kl import AnswerKL
from cats_serve.calibration.histogram import DEFAULT_BINS, DEFAULT_MAX_VALUE, ActivationHistogram
from cats_serve.calibration.scoring import collect_histograms, collect_up_rms, score_text
from cats_serve.calibration.tasks import qa_questions
from cats_serve.calibration.text_data import load_documents, pack_documents, pad_batches
from cats_serve.calibration.thresholds_file import (
    CRITERIA,
    MODES,
    CalibrationInfo,
    HeldoutInfo,
    ModelInfo,
    ThresholdsFile,
)
from cats_serve.calibration.two_threshold import SPLITS, DownSamples, TwoThresholdQuantiles

log = logging.getLogger(__name__)


@dataclass
class CalibrationConfig:
    levels: list[float]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    criterion: str = "up_rms"
    data: str = "lambada"
    search_data: str | None = None  # text of the allocated mode's KL; None = `data`
    seq_len: int = 512
    max_tokens: int = 32_768  # calibration tokens histogrammed
    max_documents: int | None = None
    batch_tokens: int = 2048  # tokens (padding included) per forward pass
    bins: int = DEFAULT_BINS
    max_value: float = DEFAULT_MAX_VALUE
    search_tokens: int = 1024  # calibration tokens the allocated mode's KL is measured on
    search_questions: int = 0  # questions the allocated mode's answer KL is measured on (0: none)
    refine_rounds: int = 4  # joint refinement rounds of the allocated mode (2L + 2 runs each)
    max_layer_sparsity: float = SENSITIVITY_GRID[-1]  # allocated mode: no layer sparser than this
    heldout_tokens: int = 16_384  # held-out tokens the realised sparsity is measured on
    two_threshold: bool = False  # a (t_up, t_down) pair per layer (two_threshold.py)
    split: float | None = None  # two-threshold split d; None: chosen per level from SPLITS
    down_sample_tokens: int = 4096  # calibration tokens the t_down quantiles are taken on

    def __post_init__(self):
        for s in self.levels:
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsity levels must be in (0, 1), got {s}")
        if not max(self.levels) <= self.max_layer_sparsity <= SENSITIVITY_GRID[-1]:
            raise ValueError(
                f"max layer sparsity must be in [{max(self.levels)}, {SENSITIVITY_GRID[-1]}], "
                f"got {self.max_layer_sparsity}"
            )
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {m!r}")
        if self.search_questions < 0:
            raise ValueError(f"search questions must be >= 0, got {self.search_questions}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.split is not None and not 0.0 <= self.split < 0.5:
            raise ValueError(f"split must be in [0, 0.5), got {self.split}")


def calibrate(
    model, tokenizer, model_info: ModelInfo, config: CalibrationConfig, *, progress: bool = True
) -> list[ThresholdsFile]:
    """One thresholds file per (mode, level), in that order.

    Leaves the criterion's per-neuron weights set on `model` (None for "silu").
    """
    calib_docs = load_documents(config.data, "calibration")
    windows, used_docs = pack_documents(
        tokenizer,
        calib_docs.texts,
        seq_len=config.seq_len,
        max_tokens=config.max_tokens,
        max_documents=config.max_documents,
    )
    batches = list(pad_batches(windows, config.batch_tokens))
    neuron_scale = None
    if config.criterion == "up_rms":
        neuron_scale = normalised_scale(collect_up_rms(model, batches, progress=progress))
    model.set_neuron_scale(neuron_scale)
    hist = ActivationHistogram(model.config.num_layers, config.bins, config.max_value)
    collect_histograms(model, batches, hist, progress=progress)
    calibration = CalibrationInfo(
        source=calib_docs.source,
        documents=used_docs,
        tokens=hist.tokens(0),
        bins=config.bins,
        bin_width=hist.bin_width,
        notes=(
            f"{SCORE_NOTES[config.criterion]} over real tokens of {config.seq_len}-token "
            "windows, dense model; "
            f"{config.bins} bins over [0, {config.max_value}) + overflow, linear within a bin"
        ),
    )

    held_docs = load_documents(config.data, "heldout")
    held_windows, _ = pack_documents(
        tokenizer, held_docs.texts, seq_len=config.seq_len, max_tokens=config.heldout_tokens
    )
    held_batches = list(pad_batches(held_windows, config.batch_tokens))

    search_docs = calib_docs
    if config.search_data not in (None, config.data):
        search_docs = load_documents(config.search_data, "calibration")
    search_windows, _ = pack_documents(
        tokenizer,
        search_docs.texts,
        seq_len=min(config.seq_len, 256),
        max_tokens=config.search_tokens,
    )
    parts = {"tokens": TokenKL(model, list(pad_batches(search_windows, config.batch_tokens)))}
    if config.search_questions:
        questions = qa_questions("calibration")[: config.search_questions]
        parts["answers"] = AnswerKL(model, tokenizer, questions, batch_tokens=config.batch_tokens)
    objective = SearchObjective(parts)

    n_layers = model.config.num_layers
    splits: dict[float, float] = {}  # level -> split (two-threshold)
    split_search: dict[float, dict[str, float]] = {}
    quantiles: dict[float, object] = {}  # level -> its quantile source (hist or pairs)
    if config.two_threshold:
        samples = DownSamples(model, batches, config.down_sample_tokens, progress=progress)
        for level in config.levels:
            tried = [config.split] if config.split is not None else list(SPLITS)
            scores = {}
            base = None
            for d in tried:
                q = TwoThresholdQuantiles(hist, samples, d)
                measured = objective.measure([q.quantile(i, level) for i in range(n_layers)])
                base = measured if base is None else base
                scores[d] = float(measured @ objective.weights(base))
            splits[level] = min(scores, key=scores.get)
            split_search[level] = {f"{d:g}": significant(v) for d, v in scores.items()}
            quantiles[level] = TwoThresholdQuantiles(hist, samples, splits[level])
            log.info("two-threshold %.2f: split %.2f (objective %s)", level, splits[level], scores)
    else:
        quantiles = dict.fromkeys(config.levels, hist)

    def thresholds_at(level: float, layer_sparsity: list[float]) -> list:
        return [quantiles[level].quantile(i, s) for i, s in enumerate(layer_sparsity)]

    per_mode: dict[str, list[list[float]]] = {}
    extra_common = {}
    if "uniform" in config.modes:
        per_mode["uniform"] = [[s] * n_layers for s in config.levels]
    if "allocated" in config.modes:
        curves_by_split: dict[float | None, np.ndarray] = {}  # None: single threshold
        cap = config.max_layer_sparsity
        per_mode["allocated"], refinement = [], {}
        for level in config.levels:
            source, split = quantiles[level], splits.get(level)
            if split not in curves_by_split:  # one set of curves per split
                curves_by_split[split] = layer_sensitivity(
                    objective.measure, source, SENSITIVITY_GRID, progress=progress
                )
            curves = curves_by_split[split]
            weights = objective.weights(objective.measure(thresholds_at(level, [level] * n_layers)))
            start = allocate_sparsity(curves @ weights, SENSITIVITY_GRID, level, max_sparsity=cap)
            alloc, history = start, []
            if config.refine_rounds > 0:
                alloc, history = refine_allocation(
                    lambda t, w=weights: float(objective.measure(t) @ w),
                    source,
                    start,
                    rounds=config.refine_rounds,
                    max_sparsity=cap,
                    progress=progress,
                )
            per_mode["allocated"].append(alloc)
            refinement[level] = {
                "weights": dict(zip(objective.names, weights.tolist(), strict=True)),
                "additive_allocation": start,
                "objective_per_round": history,
                "curves": curves,
            }
        extra_common["sensitivity_grid"] = list(SENSITIVITY_GRID)

    files = []
    for mode in config.modes:
        for level, layer_sparsity in zip(config.levels, per_mode[mode], strict=True):
            thresholds = thresholds_at(level, layer_sparsity)
            held = score_text(
                model,
                held_batches,
                thresholds,
                progress=progress,
                desc=f"held-out sparsity {mode} {level}",
            )
            divergence = dict(zip(objective.names, objective.measure(thresholds), strict=True))
            extra = {
                "calibration_kl_vs_dense": significant(divergence["tokens"]),
                "search_tokens": parts["tokens"].tokens,
                "search_source": search_docs.source,
                "heldout_perplexity": round(held.perplexity, 4),
            }
            if "answers" in parts:
                extra["calibration_answer_kl_vs_dense"] = significant(divergence["answers"])
                extra["search_questions"] = parts["answers"].questions
            if mode == "allocated":
                extra.update(extra_common)
                for p, name in enumerate(objective.names):
                    key = "sensitivity_kl" if name == "tokens" else f"sensitivity_{name}_kl"
                    curves = refinement[level]["curves"][:, :, p].tolist()
                    extra[key] = [[significant(x) for x in row] for row in curves]
                extra["max_layer_sparsity"] = cap
                weights = refinement[level]["weights"]
                extra["refinement"] = {
                    "rounds": config.refine_rounds,
                    "weights": {k: significant(w) for k, w in weights.items()},
                    **{
                        k: [round(x, 6) for x in refinement[level][k]]
                        for k in ("additive_allocation", "objective_per_round")
                    },
                }
            held_layers, held_mean = held.layer_sparsity, held.mean_sparsity
            pairs = {}
            if config.two_threshold:
                held_layers, held_mean = held.layer_row_sparsity, held.mean_row_sparsity
                q = quantiles[level]
                pairs = dict(
                    thresholds=[t for t, _ in thresholds],
                    down_thresholds=[t for _, t in thresholds],
                    layer_up_sparsity=[round(q.up_sparsity(s), 6) for s in layer_sparsity],
                )
                extra.update(
                    split=splits[level],
                    split_search=split_search[level],
                    down_sample_tokens=q.samples.tokens,
                    heldout_up_sparsity=round(held.mean_sparsity, 6),
                )
            files.append(
                ThresholdsFile(
                    model=model_info,
                    target_sparsity=level,
                    mode=mode,
                    mean_sparsity=round(sum(layer_sparsity) / len(layer_sparsity), 6),
                    layer_sparsity=[round(s, 6) for s in layer_sparsity],
                    thresholds=pairs.pop("thresholds", thresholds),
                    calibration=calibration,
                    criterion=config.criterion,
                    neuron_scale=neuron_scale,
                    heldout=HeldoutInfo(
                        source=held_docs.source,
                        tokens=held.real_tokens,
                        layer_sparsity=[round(s, 6) for s in held_layers],
                        mean_sparsity=round(held_mean, 6),
                    ),
                    extra=extra,
                    **pairs,
                )
            )
            log.info(
                "%s %.2f: held-out row sparsity %.4f, %s",
                mode,
                level,
                held_mean,
                ", ".join(f"{k} KL {v:.4f}" for k, v in divergence.items()),
            )
    return files


SCORE_NOTES = {
    "silu": "|SiLU(gate)|",
    "up_rms": "|SiLU(gate_i)| * s_i (s_i: up-projection RMS / layer mean)",
}
SCALE_DIGITS = 5  # significant digits of the per-neuron weights kept in the file
MIN_SCALE = 1e-6  # a neuron whose up projection never fires still gets a positive weight


def significant(x: float, digits: int = 6) -> float:
    """`x` to `digits` significant digits (divergences span many orders of magnitude)."""
    return float(f"{float(x):.{digits}g}")


def normalised_scale(up_rms: torch.Tensor) -> list[list[float]]:
    """[L, I] up-projection RMS -> per-layer weights with mean 1, rounded as stored."""
    scale = up_rms.double() / up_rms.double().mean(dim=1, keepdim=True).clamp_min(1e-30)
    return [[max(MIN_SCALE, float(f"{v:.{SCALE_DIGITS}g}")) for v in row] for row in scale.tolist()]


def file_name(
    model_name: str, mode: str, level: float, criterion: str = "up_rms", two: bool = False
) -> str:
    """`<model>-<mode>-<level>.json`; files of the paper's "silu" criterion add `-silu`,
    two-threshold files `-two`."""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name).strip("-.")
    tag = ("-silu" if criterion == "silu" else "") + ("-two" if two else "")
    return f"{slug}-{mode}{tag}-{level:.2f}.json"
