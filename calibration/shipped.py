"""Thresholds shipped for the default model (SmolLM2-135M-Instruct), and its default level.

calibration/thresholds/ holds the served files, two-threshold uniform at row sparsity 0.3,
0.4 and 0.5 (`*-uniform-two-*`, cats-calibrate --two-threshold, split 0.1 chosen on the search
objective at every level), and, for the record, the earlier single-threshold files: both
modes at 0.3 and 0.5 under up_rms and the CATS paper's criterion (`*-silu-*`). The server keys
levels by target row sparsity and serves one criterion and one set of per-neuron weights, so
it loads one file per level. At equal row sparsity two thresholds measured better on
perplexity and on every generative figure, and level on zero-shot accuracy (calibration/
README.md; H200, float32, full task sets, 500 generative prompts):
  0.3: perplexity +1.4% (allocated single-threshold, the earlier default: +2.2%), exact match
       -1.7 points (-2.7), chat -3.0 (-3.5), first 32 greedy tokens equal to dense 49.7%
       (41.1%); 8-task averages 44.52 / 47.30 (44.94 / 47.56);
  0.5: +8.7% (uniform single-threshold: +13.8%), exact match -6.0 (-10.3), chat -8.0
       (-14.5), equal tokens 27.4% (24.3%); 8-task averages 43.97 / 46.51 (43.75 / 46.37).
"""

from __future__ import annotations

from pathlib import Path

THRESHOLDS_DIR = Path(__file__).parent / "thresholds"
MODEL_NAME = "SmolLM2-135M-Instruct"
SHIPPED = {0.3: "uniform-two", 0.4: "uniform-two", 0.5: "uniform-two"}  # level -> file tag

# The rule for the default level: the highest shipped level that loses at most 2 points of
# exact match (the few-shot completions of cats-eval's generative set) and 1 point of the
# 8-task zero-shot average (acc and acc_norm) against dense, and that on the device it runs on
# is not slower than dense. Measured (calibration/README.md, "Two-threshold files and
# generative quality"):
#   0.3: exact match -1.7 [-4.7, +1.3], zero-shot -0.15 / +0.03      -> passes
#   0.4: exact match -1.7 [-5.0, +1.3], zero-shot -0.25 / -0.19      -> passes
#   0.5: exact match -6.0 [-10.0, -2.3], zero-shot -0.70 / -0.76     -> fails (exact match)
# Speed at 0.4, both devices: on this project's 2-core CPU, served to one client, the median
# inter-token latency was 82.7 / 93.1 ms at 0.4 against 100.9 / 98.2 ms dense in two runs of
# opposite level order (benchmarks/results/bench_serving_cpu_two_threshold.json); on CUDA,
# batch-1 decode of this model's shape ran 1.15x dense at level 0.5
# (benchmarks/results/bench_decode.json) and the two-threshold MLP block at the reads of 0.5
# with split 0.1 1.27x the dense chain (benchmarks/results/bench_mlp_two_threshold.json).
DEFAULT_SPARSITY = 0.4


def default_thresholds_files() -> list[Path]:
    """One file per level (never two with the same target sparsity)."""
    return [
        THRESHOLDS_DIR / f"{MODEL_NAME}-{tag}-{level:.2f}.json" for level, tag in SHIPPED.items()
    ]
