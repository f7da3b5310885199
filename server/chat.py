"""The `/v1/chat/completions` handler: messages -> the tokenizer's chat template -> the engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from cats_serve.server.admission import build_requests, check_model
from cats_serve.server.choices import Choice, collect, sparsity, usage
from cats_serve.server.disconnect import CLIENT_CLOSED_REQUEST, unless_disconnected
from cats_serve.server.engine_types import RequestResult
from cats_serve.server.errors import APIError
from cats_serve.server.generation import Generation
from cats_serve.server.logprobs import TokenTexts, chat_logprobs
from cats_serve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
)
from cats_serve.server.serving import ServingModel
from cats_serve.server.sse import DONE, EventStreamResponse, chunk_exclusions, sse_event


def render_prompt(serving: ServingModel, body: ChatCompletionRequest) -> list[int]:
    """The prompt's token ids: the messages through the tokenizer's chat template."""
    tokenizer = serving.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            f"the model `{serving.name}` has no chat template; use /v1/completions",
            param="messages",
            reason="invalid_request",
        )
    try:
        text = tokenizer.apply_chat_template(
            body.template_messages(), tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # templates raise on conversations they do not support
        raise APIError(
            400,
            f"the chat template rejected the messages: {exc}",
            param="messages",
            reason="invalid_request",
        ) from exc
    # The template writes any special tokens (BOS) itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, serving: ServingModel
) -> Response:
    check_model(serving, body.model)
    prompt_ids = render_prompt(serving, body)
    requests = build_requests(serving, body, [prompt_ids], body.max_new_tokens)
    generation = Generation(serving.engine, requests)
    generation.submit()
    choices = [Choice(index=i, prompt_index=0) for i in range(len(requests))]
    out = _Output(serving, body, len(prompt_ids), choices)
    if body.stream:
        return EventStreamResponse(out.stream(generation), on_close=generation.abort)
    try:
        finished, _ = await unless_disconnected(request, collect(generation, choices))
    finally:
        generation.abort()
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(out.response().model_dump())


class _Output:
    """Builds the response, or the stream of chunks, of one chat request."""

    def __init__(
        self,
        serving: ServingModel,
        body: ChatCompletionRequest,
        prompt_len: int,
        choices: list[Choice],
    ):
        self.serving = serving
        self.body = body
        self.prompt_len = prompt_len
        self.choices = choices
        self.texts = TokenTexts(serving.tokenizer)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.level = serving.default_sparsity if body.sparsity is None else body.sparsity

    def _usage(self):
        return usage(self.choices, [self.prompt_len])

    def response(self) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.serving.name,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=(
                        chat_logprobs(self.texts, c.token_ids, c.logprobs)
                        if self.body.logprobs
                        else None
                    ),
                    finish_reason=c.finish_reason,
                )
                for c in self.choices
            ],
            usage=self._usage(),
            sparsity=sparsity(self.level, self.choices),
        )

    # ---- streaming ----------------------------------------------------------------------------

    def _chunk(self, choice: ChatStreamChoice, sparsity=None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.serving.name,
            choices=[choice],
            sparsity=sparsity,
        )
        return sse_event(chunk.model_dump(exclude=chunk_exclusions(self.body, sparsity)))

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        for c in self.choices:
            first = ChatDelta(role="assistant", content="")
            yield self._chunk(ChatStreamChoice(index=c.index, delta=first))
        async for index, event in generation.events():
            c = self.choices[index]
            if isinstance(event, RequestResult):
                c.finish(event)  # raises APIError on a failed request: an error event
                last = ChatStreamChoice(
                    index=index, delta=ChatDelta(), finish_reason=c.finish_reason
                )
                yield self._chunk(last, sparsity=c.sparsity())
                continue
            c.add(event)
            logprobs = None
            if self.body.logprobs and event.token_id >= 0:
                logprobs = chat_logprobs(self.texts, [event.token_id], [event.logprob])
            if not event.text and logprobs is None:
                continue
            delta = ChatDelta(content=event.text)
            yield self._chunk(ChatStreamChoice(index=index, delta=delta, logprobs=logprobs))
        if self.body.include_usage:
            yield sse_event(
                ChatCompletionChunk(
                    id=self.id,
                    created=self.created,
                    model=self.serving.name,
                    choices=[],
                    usage=self._usage(),
                    sparsity=sparsity(self.level, self.choices),
                )
            )
        yield DONE
