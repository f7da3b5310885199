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


def choose_mlp_path(
    batch_size: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype,
    device: torch.device | str,
    union_sparsity_hint: float | None = None,
) -> str:
    """Return "sparse" or "dense" for a decode step; pure host-side, no device access.

    union_sparsity_hint: the batch union's sparsity measured at the previous step (the engine
    reads it from active_count once per step). Without a hint nothing says the sparse kernels
    will pay off, so the rule picks dense. Non-CUDA devices always get dense: the sparse
    kernels only run there through Triton's interpreter, which is for tests.
    """
    del hidden, intermediate, dtype  # the measured break-even was shape- and dtype-independent
    if torch.device(device).type != "cuda" or union_sparsity_hint is None:
        return "dense"
    for max_batch, min_sparsity in sorted(MIN_UNION_SPARSITY.items()):
        if batch_size <= max_batch:
            return "sparse" if union_sparsity_hint >= min_sparsity else "dense"
    return "dense"
