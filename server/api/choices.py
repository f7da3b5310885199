"""One choice of a response as it accumulates: text, sampled tokens with logprobs, the result.

Shared by /v1/completions and /v1/chat/completions; the handlers turn it into their own shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cats_serve.server.api.errors import APIError
from cats_serve.server.api.responses import SparsityReport, Usage
from cats_serve.server.engine.generation import Generation
from cats_serve.server.engine.sampling import TokenLogprob
from cats_serve.server.engine.types import RequestResult, TokenEvent


@dataclass
class Choice:
    index: int
    prompt_index: int  # which prompt of the request this choice continues
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    result: RequestResult | None = None

    def add(self, event: TokenEvent) -> None:
        self.text += event.text
        if event.token_id >= 0:  # -1: text held back for a stop string, released at the end
            self.token_ids.append(event.token_id)
            self.logprobs.append(event.logprob)

    def finish(self, result: RequestResult) -> None:
        self.result = result
        failure = result_failure(result)
        if failure is not None:
            raise failure

    @property
    def finish_reason(self) -> str | None:
        reason = self.result.finish_reason if self.result else None
        return reason if reason in ("stop", "length") else None

    def sparsity(self) -> SparsityReport:
        assert self.result is not None
        return sparsity(self.result.sparsity_level, [self])


def result_failure(result: RequestResult) -> APIError | None:
    """The error to report for a request the engine ended without finishing it."""
    if result.finish_reason == "error":  # the engine logged the cause; clients get no internals
        return APIError(
            500,
            "generation failed; the server's log has the cause",
            type="server_error",
            code="generation_failed",
        )
    if result.finish_reason == "abort":  # our own aborts never reach a reader: shutdown did it
        return APIError(
            503, "the request was aborted: the server is shutting down", type="server_error"
        )
    return None


async def collect(generation: Generation, choices: list[Choice]) -> list[Choice]:
    """Run a generation to the end (non-streaming); raises APIError if a request failed."""
    async for index, event in generation.events():
        if isinstance(event, RequestResult):
            choices[index].finish(event)
        else:
            choices[index].add(event)
    return choices


def usage(choices: list[Choice], prompt_lens: list[int]) -> Usage:
    """Each prompt counts once, however many choices continue it (as OpenAI counts)."""
    completion = sum(c.result.generation_tokens for c in choices if c.result)
    prompt = sum(prompt_lens)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


REPORTED = ("mlp_sparsity", "row_sparsity", "weight_bytes_skipped")


def sparsity(level: float, choices: list[Choice]) -> SparsityReport:
    """The request's realised sparsity: the choices' values weighted by their decode steps."""
    totals = dict.fromkeys(REPORTED, 0.0)
    steps = 0
    for c in choices:
        if c.result is not None and c.result.mlp_sparsity is not None:
            n = max(1, c.result.generation_tokens - 1)  # the first token comes from the prefill
            for name in REPORTED:
                totals[name] += getattr(c.result, name) * n
            steps += n
    return SparsityReport(
        level=level, **{name: total / steps if steps else None for name, total in totals.items()}
    )
