"""Host-side rule: sparse CATS kernels or dense GEMMs for one decode step."""

import torch

# Smallest union sparsity (fraction of neurons inactive for every row of the batch) at which
# the sparse kernels beat the dense path, per batch size; batches above the largest entry run
# dense. From the H200 runs in benchmarks/results/bench_mlp.json (benchmarks/notes_mlp.md,
# "dispatch rule"): at B = 1 the sparse step beat the dense path at every measured union
# sparsity (0.49 .. 0.90; e.g. Llama-2-7B bf16 64-68 us vs 77 us), and a byte model of the
# step (gate read in full + fixed latency ~ 30 us, up/down at ~3 TB/s) puts the break-even
# near 0.22; 0.35 keeps a margin. At B >= 2 the sparse step was slower than dense at every
# measured point (best: B = 2, union sparsity 0.81, 0.79x), so those batches always run dense.
MIN_UNION_SPARSITY = {1: 0.35}


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
