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

Each file also records the sparsity its thresholds realise on held-out text with the
thresholds applied to every layer at once (the distribution of later layers' inputs shifts
when earlier layers are sparse, so this differs a little from the calibration target).
Deterministic: documents in a fixed order, no sampling, no randomness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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

    def thresholds_at(layer_sparsity: list[float]) -> list[float]:
        return [hist.quantile(i, s) for i, s in enumerate(layer_sparsity)]

    per_mode: dict[str, list[list[float]]] = {}
    extra_common = {}
    if "uniform" in config.modes:
        per_mode["uniform"] = [[s] * model.config.num_layers for s in config.levels]
    if "allocated" in config.modes:
        curves = layer_sensitivity(objective.measure, hist, SENSITIVITY_GRID, progress=progress)
        cap = config.max_layer_sparsity
        per_mode["allocated"], refinement = [], {}
        for level in config.levels:
            weights = objective.weights(
                objective.measure(thresholds_at([level] * model.config.num_layers))
            )
            start = allocate_sparsity(curves @ weights, SENSITIVITY_GRID, level, max_sparsity=cap)
            alloc, history = start, []
            if config.refine_rounds > 0:
                alloc, history = refine_allocation(
                    lambda t, w=weights: float(objective.measure(t) @ w),
                    hist,
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
            }
        extra_common["sensitivity_grid"] = list(SENSITIVITY_GRID)
        for p, name in enumerate(objective.names):
            key = "sensitivity_kl" if name == "tokens" else f"sensitivity_{name}_kl"
            extra_common[key] = [[significant(x) for x in row] for row in curves[:, :, p].tolist()]

    files = []
    for mode in config.modes:
        for level, layer_sparsity in zip(config.levels, per_mode[mode], strict=True):
            thresholds = thresholds_at(layer_sparsity)
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
            files.append(
                ThresholdsFile(
                    model=model_info,
                    target_sparsity=level,
                    mode=mode,
                    mean_sparsity=round(sum(layer_sparsity) / len(layer_sparsity), 6),
                    layer_sparsity=[round(s, 6) for s in layer_sparsity],
                    thresholds=thresholds,
                    calibration=calibration,
                    criterion=config.criterion,
                    neuron_scale=neuron_scale,
                    heldout=HeldoutInfo(
                        source=held_docs.source,
                        tokens=held.real_tokens,
                        layer_sparsity=[round(s, 6) for s in held.layer_sparsity],
                        mean_sparsity=round(held.mean_sparsity, 6),
                    ),
                    extra=extra,
                )
            )
            log.info(
                "%s %.2f: held-out sparsity %.4f, %s",
                mode,
                level,
                held.mean_sparsity,
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


def file_name(model_name: str, mode: str, level: float, criterion: str = "up_rms") -> str:
    """`<model>-<mode>-<level>.json`; files of the paper's "silu" criterion add `-silu`."""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name).strip("-.")
    tag = "-silu" if criterion == "silu" else ""
    return f"{slug}-{mode}{tag}-{level:.2f}.json"
