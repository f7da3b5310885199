"""Thresholds shipped for the default model (SmolLM2-135M-Instruct), and its default level.

calibration/thresholds/ holds both modes at 0.3 and 0.5 (made by `cats-calibrate`, see
calibration/README.md). The server keys levels by target sparsity, so it loads one file per
level: the allocated ones, which lose less quality than uniform CATS at the same mean
sparsity in calibration/results/ (perplexity and the 8-task average).
"""

from __future__ import annotations

from pathlib import Path

THRESHOLDS_DIR = Path(__file__).parent / "thresholds"
MODEL_NAME = "SmolLM2-135M-Instruct"
SHIPPED_MODE = "allocated"
SHIPPED_LEVELS = (0.3, 0.5)

# Why 0.3: on held-out LAMBADA text (calibration/README.md) the allocated 0.3 file costs about
# +4% perplexity over dense, inside the issue's +10% budget, while 0.5 costs about +26% in
# either mode on this 135M model, far outside it. A request can still ask for 0.5 (or 0).
DEFAULT_SPARSITY = 0.3


def default_thresholds_files() -> list[Path]:
    """One file per level (never two with the same target sparsity)."""
    return [
        THRESHOLDS_DIR / f"{MODEL_NAME}-{SHIPPED_MODE}-{level:.2f}.json" for level in SHIPPED_LEVELS
    ]
