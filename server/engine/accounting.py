"""What a decode step and a finished request cost, from the device's active-neuron counts.

A step's counts are `[L, bucket + 1]`: per layer, the active neurons of each row, then of the
batch's union (what the sparse kernels read). A request's realised sparsity is over its own
rows; a step's stats are over every row the device ran.
"""

from __future__ import annotations

import time

import numpy as np

from cats_serve.server.engine.sequence import Sequence
from cats_serve.server.engine.types import RequestResult, StepStats


def account_step(
    counts: np.ndarray,
    ran: list[Sequence],
    read: list[Sequence],
    *,
    bucket: int,
    mlp_path: str,
    intermediate_size: int,
    bytes_per_neuron: int,
) -> StepStats:
    """Add the step's counts to each sequence in `read` (those still running) and return
    the stats of the step over the sequences it `ran`."""
    union_active = counts[:, bucket].astype(np.float64)
    for s in read:
        s.active_sums += counts[:, s.slot]
        s.decode_steps += 1
    layer_sparsity = 1.0 - counts[:, [s.slot for s in ran]].mean(axis=1) / intermediate_size
    skipped = 0
    if mlp_path == "sparse":
        skipped = int((intermediate_size - union_active).sum()) * bytes_per_neuron
    return StepStats(
        batch_size=len(ran),
        bucket=bucket,
        mlp_path=mlp_path,
        union_sparsity=float(1.0 - union_active.mean() / intermediate_size),
        weight_bytes_skipped=skipped,
        layer_sparsity=layer_sparsity.tolist(),
    )


def request_result(
    seq: Sequence, reason: str, *, intermediate_size: int, error: str | None = None
) -> RequestResult:
    """The last event of `seq`: how it ended, its text, timings and realised sparsity."""
    layer: list[float] = []
    mean = None
    if seq.decode_steps:
        per_layer = 1.0 - seq.active_sums / (seq.decode_steps * intermediate_size)
        layer = per_layer.tolist()
        mean = float(per_layer.mean())
    return RequestResult(
        request_id=seq.request.request_id,
        finish_reason=reason,
        text=seq.detok.text,
        token_ids=list(seq.tokens),
        prompt_tokens=len(seq.request.prompt_ids),
        sparsity_level=float(seq.request.sparsity),
        mlp_sparsity=mean,
        layer_sparsity=layer,
        arrival_time=seq.arrival,
        queue_time=seq.queue_time or (time.perf_counter() - seq.arrival),
        prefill_time=seq.prefill_time,
        token_times=list(seq.token_times),
        prompt_logprobs=seq.prompt_logprobs,
        error=error,
    )
