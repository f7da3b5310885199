"""`POST /v1/completions`: request -> engine requests -> JSON, or SSE chunks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from cats_serve.server.api.admission import (
    build_requests,
    check_model,
    check_prompt_chars,
    check_token_ids,
)
from cats_serve.server.api.choices import Choice
from cats_serve.server.api.constraints import compile_constraint
from cats_serve.server.api.errors import APIError
from cats_serve.server.api.logprob_shapes import completion_logprobs, merge
from cats_serve.server.api.openapi import streamed
from cats_serve.server.api.protocol import CompletionRequest
from cats_serve.server.api.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamChunk,
)
from cats_serve.server.api.serving import ServingModel
from cats_serve.server.api.state import ServingDep, v1_router
from cats_serve.server.api.streaming import ResponseBuilder
from cats_serve.server.engine.types import TokenEvent


@dataclass
class Prompt:
    text: str
    ids: list[int]


def tokenize_prompts(serving: ServingModel, body: CompletionRequest) -> list[Prompt]:
    raw = body.prompt
    if isinstance(raw, str):
        raw = [raw]
    elif raw and isinstance(raw[0], int):
        raw = [raw]  # one prompt given as token ids
    prompts = []
    for item in raw:
        if isinstance(item, str):
            check_prompt_chars(serving, len(item), "prompt")
            prompts.append(Prompt(item, serving.tokenizer(item)["input_ids"]))
        else:
            check_token_ids(serving, item)
            prompts.append(Prompt(serving.tokenizer.decode(item), list(item)))
    return prompts


router = v1_router()


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=streamed(CompletionStreamChunk),
    summary="Complete a prompt",
)
async def create_completion(
    body: CompletionRequest, request: Request, serving: ServingDep
) -> Response:
    check_model(serving, body.model)
    if body.stream and body.echo and body.logprobs is not None:
        raise APIError(
            400,
            "echo with logprobs is not supported when streaming",
            param="echo",
            reason="invalid_request",
        )
    # off the event loop: a long prompt must not hold up /health and every stream
    prompts = await asyncio.to_thread(tokenize_prompts, serving, body)
    want_prompt_logprobs = body.echo and body.logprobs is not None
    constraint = await compile_constraint(serving, body)
    requests = build_requests(
        serving,
        body,
        [p.ids for p in prompts],
        body.max_tokens,
        prompt_logprobs=want_prompt_logprobs,
        constraint=constraint,
    )
    return await _Output(serving, body, prompts).respond(request, requests)


class _Output(ResponseBuilder):
    """Builds the response, or the stream of chunks, of one completion request."""

    id_prefix = "cmpl"
    chunk_model = CompletionStreamChunk

    def __init__(self, serving: ServingModel, body, prompts: list[Prompt]):
        super().__init__(serving, body, [len(p.ids) for p in prompts])
        self.prompts = prompts
        # where each choice's next streamed token starts in its text (logprobs' text_offset)
        self._offsets = {c.index: len(self.prefix(c)) for c in self.choices}

    def prefix(self, choice: Choice) -> str:
        return self.prompts[choice.prompt_index].text if self.body.echo else ""

    def _logprobs(self, choice: Choice) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        prefix = self.prefix(choice)
        generated = completion_logprobs(
            self.texts, choice.token_ids, choice.logprobs, offset=len(prefix)
        )
        result = choice.result
        if not (self.body.echo and result and result.prompt_logprobs):
            return generated
        prompt_ids = self.prompts[choice.prompt_index].ids
        echoed = completion_logprobs(self.texts, prompt_ids, result.prompt_logprobs)
        return merge(echoed, generated)

    def response(self) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.serving.name,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=self.prefix(c) + c.text,
                    logprobs=self._logprobs(c),
                    finish_reason=c.finish_reason,
                )
                for c in self.choices
            ],
            usage=self.usage(),
            sparsity=self.sparsity(),
        )

    # ---- streaming pieces ---------------------------------------------------------------------

    def opening(self, choice: Choice) -> CompletionChoice | None:
        return (
            CompletionChoice(index=choice.index, text=self.prefix(choice))
            if self.body.echo
            else None
        )

    def delta(self, choice: Choice, event: TokenEvent) -> CompletionChoice | None:
        want_logprobs = self.body.logprobs is not None
        if not event.text and not (want_logprobs and event.token_id >= 0):
            return None
        logprobs = None
        if want_logprobs:
            ids = [event.token_id] if event.token_id >= 0 else []
            offset = self._offsets[choice.index]
            logprobs = completion_logprobs(self.texts, ids, [event.logprob] if ids else [], offset)
            self._offsets[choice.index] = offset + sum(len(t) for t in logprobs.tokens)
        return CompletionChoice(index=choice.index, text=event.text, logprobs=logprobs)

    def closing(self, choice: Choice) -> CompletionChoice:
        return CompletionChoice(index=choice.index, text="", finish_reason=choice.finish_reason)
