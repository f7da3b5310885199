"""One request's life inside the engine: its slot, position, tokens, timings and counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cats_serve.server.engine.detokenizer import IncrementalDetokenizer
from cats_serve.server.engine.sampling import RowSampler
from cats_serve.server.engine.types import GenerationRequest, RequestResult, TokenEvent

Sink = Callable[[TokenEvent | RequestResult], None]


@dataclass
class Sequence:
    request: GenerationRequest
    sink: Sink
    arrival: float
    sampler: RowSampler
    detok: IncrementalDetokenizer
    slot: int = -1
    position: int = 0  # where the next fed token's KV is written
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    queue_time: float = 0.0
    prefill_time: float = 0.0
    # [2, L]: active and down-active neurons of this row, summed over decode steps
    active_sums: np.ndarray | None = None
    decode_steps: int = 0
    bytes_skipped_sum: float = 0.0  # each decode step's fraction of MLP weight bytes not read
    prompt_logprobs: list | None = None


def prefill_groups(admitted: list[Sequence], max_tokens: int) -> list[list[Sequence]]:
    """Admitted sequences in arrival order, cut into passes of <= max_tokens prompt tokens
    (a prompt longer than that is a pass of its own)."""
    groups: list[list[Sequence]] = []
    total = 0
    for seq in admitted:
        n = len(seq.request.prompt_ids)
        if groups and total + n <= max_tokens:
            groups[-1].append(seq)
            total += n
        else:
            groups.append([seq])
            total = n
    return groups


class SlotPool:
    """Free KV-cache slots, handed out lowest first: running sequences stay packed at the
    front, so a step covers the smallest batch-size bucket that holds them."""

    def __init__(self, size: int):
        self._free = list(range(size))

    def __bool__(self) -> bool:
        return bool(self._free)

    def take(self) -> int:
        return self._free.pop(0)

    def give(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort()
