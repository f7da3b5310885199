"""From a validated API request to checked engine requests: model, sparsity level, prompts x n.

Everything is checked before anything is submitted, so a bad request is refused whole.
"""

from __future__ import annotations

import dataclasses
import uuid

from cats_serve.server.api.constraints import Constraint
from cats_serve.server.api.errors import APIError, model_not_found
from cats_serve.server.api.protocol import SamplingFields
from cats_serve.server.api.serving import ServingModel
from cats_serve.server.engine.types import GenerationRequest


def check_model(serving: ServingModel, name: str) -> None:
    if name != serving.name:
        raise model_not_found(name, serving.name)


def requested_level(serving: ServingModel, body: SamplingFields) -> float:
    """The loaded level the request names (its `sparsity`, else the server's default);
    UnknownSparsityError (a 400) when none is that close."""
    if body.sparsity is None:
        return serving.default_sparsity
    return serving.engine.resolve_level(body.sparsity)


def check_prompt_chars(serving: ServingModel, chars: int, param: str) -> None:
    """Refuse, before tokenizing, a prompt too long to fit the context whatever its tokens:
    no token is longer than `max_token_chars`, so it has at least chars / that many."""
    most = serving.max_seq_len * serving.max_token_chars
    if chars > most:
        raise APIError(
            400,
            f"This model's maximum context length is {serving.max_seq_len} tokens. However, "
            f"your prompt has {chars} characters, more than that many tokens can hold (at most "
            f"{most} characters). Please reduce the length of the prompt.",
            param=param,
            code="context_length_exceeded",
            reason="context_length",
        )


def check_token_ids(serving: ServingModel, ids: list[int]) -> None:
    vocab = serving.engine.model.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"prompt token id {bad} is out of range (vocabulary size {vocab})",
            param="prompt",
            code="invalid_value",
            reason="invalid_request",
        )


def check_logit_bias(serving: ServingModel, body: SamplingFields) -> None:
    vocab = serving.engine.model.config.vocab_size
    bad = next((k for k in body.logit_bias or {} if int(k) >= vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"logit_bias: token id {bad} is out of range (vocabulary size {vocab})",
            param="logit_bias",
            code="invalid_value",
            reason="invalid_request",
        )


def build_requests(
    serving: ServingModel,
    body,
    prompt_ids: list[list[int]],
    max_tokens: int | None,
    *,
    prompt_logprobs: bool = False,
    constraint: Constraint | None = None,
) -> list[GenerationRequest]:
    """One engine request per (prompt, choice), prompt-major, each checked by the engine.

    `body` is a CompletionRequest or ChatCompletionRequest; max_tokens=None means "up to the
    context length". Choice j > 0 of a seeded request samples with seed + j, so the n choices
    differ and the whole response is still reproducible.
    """
    level = requested_level(serving, body)
    check_logit_bias(serving, body)
    total = len(prompt_ids) * body.n
    if total > serving.engine.max_queue:
        raise APIError(
            400,
            f"this request asks for {total} sequences ({len(prompt_ids)} prompt(s) x n={body.n}); "
            f"the server queues at most {serving.engine.max_queue} at once",
            param="n" if body.n > 1 else "prompt",
            code="too_many_sequences",
            reason="invalid_request",
        )
    requests = []
    for ids in prompt_ids:
        budget = max_tokens or max(1, serving.max_seq_len - len(ids))
        base = body.to_sampling_params(budget, serving.default_temperature)
        for j in range(body.n):
            params = base
            if base.seed is not None and j:
                params = dataclasses.replace(base, seed=base.seed + j)
            request = GenerationRequest(
                request_id=uuid.uuid4().hex,
                prompt_ids=list(ids),
                params=params,
                sparsity=level,
                prompt_logprobs=prompt_logprobs,
                grammar=constraint.grammar if constraint else None,
                constraint=constraint.label if constraint else None,
            )
            serving.engine.check(request)  # EngineError -> OpenAI-shaped 400 (errors.py)
            requests.append(request)
    return requests
