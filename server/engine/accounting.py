"""What a decode step and a finished request cost, from the device's neuron counts.

A step's counts are `[2, L, bucket + 1]`: per layer, the active neurons (which need their W_up
row) of each row, then of the batch's union, and the same for the down-active neurons (which
also need their W_down row; the two agree for single-threshold levels). The sparse kernels
read the union's rows; the dense path reads every row. Quantities, each under one name (see
docs/observability.md):
- mlp_sparsity: fraction of MLP neurons inactive (their W_up row not needed), per request row;
- row_sparsity: fraction of W_up and W_down rows not needed, per request row (what a level
  names: with one threshold it equals mlp_sparsity);
- weight_bytes_skipped: fraction of the MLP's weight bytes (W_gate, W_up, W_down) a decode
  step really did not read; 0 for a step on the dense path. A request's is the mean over its
  decode steps; a step's is shared by every row in it.
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
    bytes_per_row: int,
) -> StepStats:
    """Add the step's counts to each sequence in `read` (those still running) and return
    the stats of the step over the sequences it `ran`."""
    union = counts[:, :, bucket].astype(np.float64)  # [2, L]: active, down-active
    skipped = 0
    if mlp_path == "sparse":
        skipped = int((intermediate_size - union).sum()) * bytes_per_row
    layers = counts.shape[1]
    fraction = skipped / (3 * intermediate_size * layers * bytes_per_row)  # of W_gate+up+down
    for s in read:
        s.active_sums += counts[:, :, s.slot]
        s.decode_steps += 1
        s.bytes_skipped_sum += fraction
    layer_sparsity = 1.0 - counts[0][:, [s.slot for s in ran]].mean(axis=1) / intermediate_size
    return StepStats(
        batch_size=len(ran),
        bucket=bucket,
        mlp_path=mlp_path,
        union_sparsity=float(1.0 - union[0].mean() / intermediate_size),
        weight_bytes_skipped=skipped,
        weight_bytes_skipped_ratio=fraction,
        layer_sparsity=layer_sparsity.tolist(),
    )


def request_result(
    seq: Sequence, reason: str, *, intermediate_size: int, error: str | None = None
) -> RequestResult:
    """The last event of `seq`: how it ended, its text, timings and realised sparsity."""
    grammar = seq.sampler.grammar
    layer: list[float] = []
    mean = rows = skipped = None
    if seq.decode_steps:
        inactive = 1.0 - seq.active_sums / (seq.decode_steps * intermediate_size)  # [2, L]
        layer = inactive[0].tolist()
        mean = float(inactive[0].mean())
        rows = float(inactive.mean())
        skipped = seq.bytes_skipped_sum / seq.decode_steps
    return RequestResult(
        request_id=seq.request.request_id,
        finish_reason=reason,
        text=seq.detok.text,
        token_ids=list(seq.tokens),
        prompt_tokens=len(seq.request.prompt_ids),
        sparsity_level=float(seq.request.sparsity),
        mlp_sparsity=mean,
        row_sparsity=rows,
        weight_bytes_skipped=skipped,
        layer_sparsity=layer,
        arrival_time=seq.arrival,
        queue_time=seq.queue_time or (time.perf_counter() - seq.arrival),
        prefill_time=seq.prefill_time,
        token_times=list(seq.token_times),
        prompt_logprobs=seq.prompt_logprobs,
        error=error,
        constraint=seq.request.constraint,
        grammar_mask_seconds=grammar.mean_mask_seconds if grammar is not None else None,
    )
