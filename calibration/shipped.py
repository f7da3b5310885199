"""Thresholds shipped for the default model (SmolLM2-135M-Instruct), and its default level.

calibration/thresholds/ holds both modes at 0.3 and 0.5 under the up_rms criterion (the
served ones; the allocated files measured their KL on built-in "mix" text) and, for the
record, the CATS paper's criterion (`*-silu-*`); see calibration/README.md. The server keys
levels by target sparsity and serves one criterion, so it loads one up_rms file per level,
the mode that measured better there (full validation sets of the 8 tasks, held-out
perplexity): allocated at 0.3 (perplexity +2.2% vs +2.9% for uniform, 8-task averages
44.94 / 47.56 vs 44.62 / 46.98 acc / acc_norm), uniform at 0.5 (allocated has the lower
perplexity, +13.6% vs +13.8%, but lower 8-task averages, 43.08 / 45.75 vs 43.75 / 46.37)."""

from __future__ import annotations

from pathlib import Path

THRESHOLDS_DIR = Path(__file__).parent / "thresholds"
MODEL_NAME = "SmolLM2-135M-Instruct"
SHIPPED = {0.3: "allocated", 0.5: "uniform"}  # level -> mode

# Why 0.3: the allocated 0.3 file costs +2.2% held-out perplexity and no 8-task accuracy
# (47.56 vs dense 47.27 acc_norm, 44.94 vs 44.67 acc; calibration/README.md), well inside the
# issue's budget (+10%, 1.5 points), while 0.5 costs +13.6-13.8% perplexity (0.9 points of
# the averages) on this 135M model. A request can still ask for 0.5 (or 0).
DEFAULT_SPARSITY = 0.3


def default_thresholds_files() -> list[Path]:
    """One file per level (never two with the same target sparsity)."""
    return [
        THRESHOLDS_DIR / f"{MODEL_NAME}-{mode}-{level:.2f}.json" for level, mode in SHIPPED.items()
    ]
