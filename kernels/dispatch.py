"""Host-side rule: sparse CATS kernels or dense GEMMs for one decode step."""

import torch

# Smallest union sparsity (fraction of neurons inactive for every row of the batch) at which
# the sparse kernels beat the dense path, per batch size (a batch size uses the entry of the
# smallest key >= it); batches above the largest key run dense. From the H200 run of the v4
# kernels (packed active list + fused up/down) in benchmarks/results/bench_mlp.json
# (benchmarks/notes_mlp.md, "dispatch rule"): least-squares fits of sparse / dense-path time
# against the union's active fraction f over both shapes and dtypes:
#   B = 1: 0.45 + 0.61 f (break-even at union sparsity 0.11; measured 0.49 .. 0.97)
#   B = 2: 0.56 + 0.84 f (break-even 0.48; union 0.49-0.50: 0.98-1.05, 0.81-0.82: 0.65-0.75)
#   B = 4: 0.80 + 1.18 f (break-even 0.83; union 0.884: 0.88-1.01, Mistral bf16 the 1.01)
# Each threshold keeps a margin above the worst measured break-even. B >= 5 always runs dense:
# at B = 8 the sparse step was >= 2.6x slower than dense at every point (union up to 0.79).
MIN_UNION_SPARSITY = {1: 0.3, 2: 0.6, 4: 0.9}

# CPU (no Triton): the sparse path is `cats_mlp_gather` (torch ops; copies the union-active rows
# of W_up and W_down^T into a scratch buffer, then multiplies). From benchmarks/bench_mlp_cpu.py
# on a 2-core AMD EPYC shared with other jobs (benchmarks/results/bench_mlp_cpu.json; repeated
# runs moved single cells by up to 2x, so the rule keeps only what held in every run). When one
# weight matrix stays in the CPU's caches (SmolLM2-135M: 576 x 1536 fp32), gathering beat
# dense at B = 1 from union sparsity 0.3 (1.09-1.97x) and at B = 2 at every measured union
# (1.21-1.49x); from B = 4 it lost in one run at low union sparsity. When it does not
# (Llama-2-7B: 4096 x 11008 fp32), the copy costs about what the skipped rows save: B = 1 gains
# from union sparsity 0.7 (1.16x), B = 2 from 0.8 (1.70x). Whole decode steps of the default
# model (benchmarks/results/bench_decode_cpu.json): 1.07x at level 0.3 and 1.12x at 0.5 for
# B = 1 and 2, 0.80-0.98x at B = 4. All of that is float32: with bf16 weights on a CPU with
# native bf16 the dense products are fast enough that gathering lost at every level and batch
# size (0.77-0.97x), so other dtypes run dense.
# Served, the small case loses what the isolated steps gain: through the HTTP server (the
# engine thread sharing the 2 cores with the event loop) one client's median inter-token
# latency was 97 ms dense, 115 ms at level 0.3 and 106 ms at 0.5 with gathering from union
# sparsity 0.3 (benchmarks/results/bench_serving_cpu.json, "before"), while the isolated steps
# of the same session gave 1.00x / 1.08x. So cache-resident matrices gather only where the
# isolated gain was large (union sparsity >= 0.7 at B = 1: 1.4-1.97x), which no shipped level
# of the default model reaches: its levels decode on the dense path there.
# Int8 weights on a CPU (torch's packed int8 kernel, dense; the gather path would copy int8
# rows and run the same kernel on them): dense at every batch size and level, see
# benchmarks/README.md "Int8 weights".
CACHE_RESIDENT_BYTES = 8 << 20  # one weight matrix at most this big counts as cache-resident
MIN_UNION_SPARSITY_CPU_SMALL = {1: 0.7}
MIN_UNION_SPARSITY_CPU_LARGE = {1: 0.7, 2: 0.8}


def choose_mlp_path(
    batch_size: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype,
    device: torch.device | str,
    union_sparsity_hint: float | None = None,
    int8: bool = False,
) -> str:
    """Return "sparse" or "dense" for a decode step; pure host-side, no device access.

    union_sparsity_hint: the batch union's sparsity measured at the previous step (the engine
    reads it from active_count once per step). Without a hint nothing says the sparse path
    will pay off, so the rule picks dense. int8: the weights are int8 (`Int8Matrix`). On CUDA
    "sparse" means the Triton kernels, on CPU the gather path; other devices always get dense.
    """
    kind = torch.device(device).type
    if union_sparsity_hint is None or kind not in ("cuda", "cpu"):
        return "dense"
    if kind == "cuda":  # the measured break-even was shape- and dtype-independent
        rule = MIN_UNION_SPARSITY
    elif dtype != torch.float32 or int8:
        return "dense"
    elif hidden * intermediate * dtype.itemsize <= CACHE_RESIDENT_BYTES:
        rule = MIN_UNION_SPARSITY_CPU_SMALL
    else:
        rule = MIN_UNION_SPARSITY_CPU_LARGE
    for max_batch, min_sparsity in sorted(rule.items()):
        if batch_size <= max_batch:
            return "sparse" if union_sparsity_hint >= min_sparsity else "dense"
    return "dense"
