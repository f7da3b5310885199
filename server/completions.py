"""The `/v1/completions` handler: request -> engine requests -> JSON, or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from cats_serve.server.admission import build_requests, check_model, check_token_ids
from cats_serve.server.choices import Choice
from cats_serve.server.engine_types import RequestResult
from cats_serve.server.errors import APIError
from cats_serve.server.generation import Generation
from cats_serve.server.logprobs import completion_logprobs, merge
from cats_serve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
)
from cats_serve.server.response_builder import ResponseBuilder
from cats_serve.server.serving import ServingModel
from cats_serve.server.sse import DONE


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
            prompts.append(Prompt(item, serving.tokenizer(item)["input_ids"]))
        else:
            check_token_ids(serving, item)
            prompts.append(Prompt(serving.tokenizer.decode(item), list(item)))
    return prompts


async def create_completion(
    body: CompletionRequest, request: Request, serving: ServingModel
) -> Response:
    check_model(serving, body.model)
    if body.stream and body.echo and body.logprobs is not None:
        raise APIError(
            400,
            "echo with logprobs is not supported when streaming",
            param="echo",
            reason="invalid_request",
        )
    prompts = tokenize_prompts(serving, body)
    want_prompt_logprobs = body.echo and body.logprobs is not None
    requests = build_requests(
        serving,
        body,
        [p.ids for p in prompts],
        body.max_tokens,
        prompt_logprobs=want_prompt_logprobs,
    )
    generation = Generation(serving.engine, requests)
    generation.submit()
    choices = [Choice(index=i, prompt_index=i // body.n) for i in range(len(requests))]
    out = _Output(serving, body, prompts, choices)
    return await out.respond(request, generation)


class _Output(ResponseBuilder):
    """Builds the response, or the stream of chunks, of one completion request."""

    id_prefix = "cmpl"
    chunk_model = CompletionStreamChunk

    def __init__(self, serving: ServingModel, body, prompts: list[Prompt], choices: list[Choice]):
        super().__init__(serving, body, choices, [len(p.ids) for p in prompts])
        self.prompts = prompts

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

    # ---- streaming ----------------------------------------------------------------------------

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        want_logprobs = self.body.logprobs is not None
        offsets = [len(self.prefix(c)) for c in self.choices]
        for c in self.choices:
            if self.body.echo:
                yield self.chunk(CompletionChoice(index=c.index, text=self.prefix(c)))
        async for index, event in generation.events():
            c = self.choices[index]
            if isinstance(event, RequestResult):
                c.finish(event)  # raises APIError on a failed request: an error event
                last = CompletionChoice(index=index, text="", finish_reason=c.finish_reason)
                yield self.chunk(last, sparsity=c.sparsity())
                continue
            c.add(event)
            if not event.text and not (want_logprobs and event.token_id >= 0):
                continue
            logprobs = None
            if want_logprobs:
                ids = [event.token_id] if event.token_id >= 0 else []
                logprobs = completion_logprobs(
                    self.texts, ids, [event.logprob] if ids else [], offsets[index]
                )
                offsets[index] += sum(len(t) for t in logprobs.tokens)
            yield self.chunk(CompletionChoice(index=index, text=event.text, logprobs=logprobs))
        if self.body.include_usage:
            yield self.usage_chunk()
        yield DONE
