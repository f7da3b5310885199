"""What goes into the engine and what comes out: plain dataclasses, no HTTP, no Prometheus."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from cats_serve.server.engine.grammar import CompiledGrammar
from cats_serve.server.engine.sampling import SamplingParams, TokenLogprob


class EngineError(Exception):
    """A request the engine cannot take; `reason` is a short stable label (for metrics)."""

    reason = "invalid_request"


class ContextLengthError(EngineError):
    reason = "context_length"

    def __init__(self, max_len: int, prompt_tokens: int, max_tokens: int):
        self.max_len = max_len
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        super().__init__(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            f"in the completion). Please reduce the length of the prompt or completion."
        )


class QueueFullError(EngineError):
    reason = "queue_full"


class UnknownSparsityError(EngineError):
    reason = "unknown_sparsity"


class EngineStoppedError(EngineError):
    reason = "shutting_down"


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sparsity: float = 0.0  # one of the loaded levels; 0 = dense
    prompt_logprobs: bool = False  # return logprobs of the prompt tokens (echo + logprobs)
    grammar: CompiledGrammar | None = None  # constrain the generated tokens (Engine.grammars)
    constraint: str | None = None  # what the grammar is for, a short label (for metrics)


@dataclass
class TokenEvent:
    """One generated token and the text it made safe to show (may be empty)."""

    token_id: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass
class RequestResult:
    """The last event of every request: how it ended and what it cost."""

    request_id: str
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    text: str
    token_ids: list[int]
    prompt_tokens: int
    sparsity_level: float
    # realised over this request's decode steps (None: nothing decoded); see accounting.py
    mlp_sparsity: float | None  # inactive neurons, mean over layers
    row_sparsity: float | None  # W_up and W_down rows not needed, mean over layers
    weight_bytes_skipped: float | None  # fraction of MLP weight bytes not read, mean over steps
    layer_sparsity: list[float]  # inactive neurons per layer
    arrival_time: float
    queue_time: float
    prefill_time: float
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    constraint: str | None = None  # the request's constraint label, None if unconstrained
    grammar_mask_seconds: float | None = None  # mean time to compute one token's mask

    @property
    def generation_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def time_to_first_token(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def e2e_latency(self) -> float:
        end = self.token_times[-1] if self.token_times else self.arrival_time + self.queue_time
        return max(end - self.arrival_time, self.queue_time + self.prefill_time)

    @property
    def decode_time(self) -> float:
        return self.token_times[-1] - self.token_times[0] if len(self.token_times) > 1 else 0.0


@dataclass
class StepStats:
    """One decode step of the whole batch."""

    batch_size: int
    bucket: int
    mlp_path: str  # "sparse" | "dense"
    union_sparsity: float  # fraction of neurons inactive for every row, mean over layers
    weight_bytes_skipped: int  # W_up/W_down bytes the sparse path did not read (0 if dense)
    weight_bytes_skipped_ratio: float  # that, as a fraction of all MLP weight bytes
    layer_sparsity: list[float]  # mean realised per-row sparsity per layer in this step
